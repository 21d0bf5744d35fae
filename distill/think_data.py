"""Cold-start data for a reasoning variant (Magistral Small's recipe in miniature): conversations whose assistant turn
holds a short thinking (`reasoning`, rendered between `<think>` tags by distill/chat_data.py) and then its answer.

Two parts, both small and honest about what they are:
- arithmetic from the training split only (held-out operand pairs never appear), with a templated worked step
  ("7 times 2: 2 groups of 7. 7 * 2 = 14.") and the number alone as the answer;
- general questions (distill/prompts/general.jsonl, minus any the evals ask) answered by the model itself, greedy,
  with a templated thinking that restates the question: the format is taught, the model's own knowledge kept (no
  other model writes its answers). Answers that do not end within `max_new_tokens` are left out.

`python -m distill.think_data OUT.jsonl [--model smollm2-135m-instruct]` writes the file; the repo ships the one
distill/recipes/posttrain/smollm2-think-sft.yaml trains on (distill/prompts/think-cold-start.jsonl), so a fresh
clone needs no generation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distill.arithmetic import Problem, problems
from models.checkpoint import write_text_atomic

SIGN = {"plus": "+", "minus": "-", "times": "*"}
GENERAL_PROMPTS = Path(__file__).parent / "prompts" / "general.jsonl"
EVAL_TASKS = Path(__file__).parents[1] / "eval" / "tasks"


def worked_step(p: Problem) -> str:
    how = {"plus": f"start at {p.a} and count {p.b} more", "minus": f"take {p.b} away from {p.a}",
           "times": f"{p.b} groups of {p.a}"}[p.op]
    return f"{p.a} {p.op} {p.b}: {how}. {p.a} {SIGN[p.op]} {p.b} = {p.answer}."


def arithmetic_record(p: Problem) -> dict:
    return {"messages": [{"role": "user", "content": p.question},
                         {"role": "assistant", "reasoning": worked_step(p), "content": str(p.answer)}]}


def general_thinking(question: str) -> str:
    return f"The question is: {question} I will answer it directly and briefly."


def eval_questions() -> set[str]:
    """Every request the project's own server checks ask, so none becomes training data."""
    asked = set()
    for path in EVAL_TASKS.glob("*.json"):
        for case in json.loads(path.read_text()).get("cases", []):
            if isinstance(case.get("request"), str):
                asked.add(case["request"].strip().casefold())
    return asked


def self_answers(model: str, questions: list[str], max_new_tokens: int = 96, batch_size: int = 16
                 ) -> list[str | None]:
    """The model's own greedy answers, each as the server renders the chat; None for one cut at the limit."""
    import torch
    from tqdm import tqdm

    from distill.model_io import load_model
    from models.prepare import prepare
    from models.registry import get_model
    from models.tokenizers import load_tokenizer

    spec = get_model(model)
    lm = load_model(prepare(spec)).eval()
    tok = load_tokenizer(spec)
    eos = tok.eos_token_id
    out: list[str | None] = []
    for start in tqdm(range(0, len(questions), batch_size), desc="self answers", unit="batch"):
        part = questions[start:start + batch_size]
        prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in part]
        width = max(map(len, prompts))
        ids = torch.tensor([[eos] * (width - len(x)) + x for x in prompts])  # left-padded
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompts])
        with torch.no_grad():
            generated = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=eos)
        for row in generated[:, width:].tolist():
            out.append(tok.decode(row[: row.index(eos)]).strip() if eos in row else None)
    return out


def build(model: str, max_new_tokens: int = 96) -> tuple[list[dict], dict[str, int]]:
    records = [arithmetic_record(p) for p in problems("train")]
    asked = eval_questions()
    questions = [json.loads(line)["prompt"] for line in GENERAL_PROMPTS.read_text().splitlines() if line.strip()]
    kept = [q for q in questions if q.strip().casefold() not in asked]
    answers = self_answers(model, kept, max_new_tokens)
    general = [{"messages": [{"role": "user", "content": q},
                             {"role": "assistant", "reasoning": general_thinking(q), "content": a}]}
               for q, a in zip(kept, answers, strict=True) if a]
    counts = {"arithmetic": len(records), "general": len(general), "left_out_eval": len(questions) - len(kept),
              "left_out_unfinished": sum(a is None for a in answers)}
    return records + general, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.think_data", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="whose own answers the general part holds")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    records, counts = build(args.model, args.max_new_tokens)
    write_text_atomic(args.out, "".join(json.dumps(r) + "\n" for r in records))
    print(f"{len(records)} conversations -> {args.out} ({counts})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
