# make demo: a fresh clone -> .venv -> train-teachers then distill on the embedded digits data.
# make test: a fresh clone -> .venv -> the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast bench reproduce lint clean-outputs

venv: $(STAMP)

# Reinstalled whenever pyproject.toml changes. torch resolves to the newest release
# pyproject allows (<= 2.14.1). Bytecode is compiled at install: with PYTHONDONTWRITEBYTECODE
# set (as on this machine) nothing else would, and every test process would recompile torch.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev,launchers,tracking,search,onnx]"
	touch $(STAMP)

# The demo's settings were tuned on digits (1,213 training images of 8x8 pixels): five small
# CNN teachers trained on views shifted by up to 1 pixel, and a 64-unit student that needs many short epochs.
DEMO_TEACHERS := model=cnn augment=shift augment.pixels=1 train.epochs=60
DEMO_STUDENT := T=2 alpha=0.7 train.epochs=200 train.batch_size=32

demo: venv
	$(BIN)/distillrun train-teachers $(DEMO_TEACHERS)
	$(BIN)/distillrun distill $(DEMO_STUDENT)

# The test files are shared out among one process per core (pytest-xdist); a file's tests stay
# in one process, so its module fixtures are built once.
test: venv
	$(BIN)/python -m pytest -q -n auto --dist loadfile

# The inner loop: everything but the end-to-end runs of the command (marked slow), on every core.
test-fast: venv
	$(BIN)/python -m pytest -q -n auto --dist loadfile -m "not slow"

# Benchmarks against plain PyTorch loops in the same process (not part of `make test`):
# a table on the terminal and the figures in outputs/bench.json. MNIST from DISTILLRUN_DATA
# (default ../shared/data/mnist); without it the throughput figures use random data of its shape.
bench: venv
	$(BIN)/python -m distillrun.tools.bench --out outputs/bench.json

# The paper's MNIST results (docs/method.md#mnist), and students on consistent views
# (docs/method.md#consistent-teaching), with one command, about 33 minutes on 2 CPU cores:
# outputs/reproduce/<timestamp>/report.md, report.json and errors_vs_T.png. MNIST=<root>
# (torchvision's layout; default ../shared/data/mnist), DOWNLOAD=1 to fetch it there, SEEDS=n
# to train every student with n seeds (mean and standard deviation; the teachers once),
# RESUME=<that folder> to continue an interrupted reproduction, ARGS="device=cuda" for overrides
# given to every stage.
MNIST ?= $(or $(DISTILLRUN_DATA),../shared/data/mnist)
SEEDS ?= 1
reproduce: venv
	$(BIN)/python -m distillrun.tools.reproduce --data-root $(MNIST) $(if $(DOWNLOAD),--download) \
		--seeds $(SEEDS) $(if $(RESUME),--resume $(RESUME)) $(ARGS)

# The logit losses side by side (docs/compare.md): every loss= (and KD, DKD with logit
# standardisation) and the hard-label baseline, seeds 0-2, on digits and on MNIST's 3% with
# consistent views: outputs/compare/<timestamp>/report.md and report.json. TEACHERS=<a `make
# reproduce` folder>/teachers reuses its MNIST teachers (else trained here, 11 minutes);
# SETTINGS=digits for the digits part alone; SEEDS=n (default 3 here), MNIST, DOWNLOAD, RESUME
# and ARGS as for reproduce.
.PHONY: compare
compare: venv
	$(BIN)/python -m distillrun.tools.compare --data-root $(MNIST) $(if $(DOWNLOAD),--download) \
		--seeds $(if $(filter command line environment,$(origin SEEDS)),$(SEEDS),3) $(if $(TEACHERS),--teachers $(TEACHERS)) \
		$(if $(SETTINGS),--settings $(SETTINGS)) $(if $(RESUME),--resume $(RESUME)) $(ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The paper's specialists (docs/method.md#specialists) on dataset=jft_like, generated offline: the
# generalist, its specialists, their KL combination and the combination distilled back, about 3
# minutes on 2 CPU cores: outputs/reproduce-specialists/<timestamp>/report.md and report.json.
# RESUME=<that folder> continues an interrupted one; ARGS="device=cuda" for overrides.
.PHONY: reproduce-specialists
reproduce-specialists: venv
	$(BIN)/python -m distillrun.tools.reproduce_specialists $(if $(RESUME),--resume $(RESUME)) $(ARGS)
