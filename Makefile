# fedsocial: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_HOME := $(CURDIR)/.flwr
DEMO_OUT ?= runs/demo

.PHONY: venv demo test lint fuzz bench bench-perf bench-scale bench-gpu bench-fed bench-privacy bench-serve e2e clean

venv: $(STAMP)

# CPU torch first: a plain torch requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The main job: a 3-partner federated simulation with user-level DP on the synthetic default, an
# empirical lower bound on epsilon from canary users (shown in the privacy report), then the audit
# of its own privacy ledgers.
demo: $(STAMP)
	$(VENV)/bin/fedsocial simulate --config configs/demo.toml --out $(DEMO_OUT)
	$(VENV)/bin/fedsocial canary-audit --config configs/demo.toml --canaries 300 --canary-items 5 --out $(DEMO_OUT)
	$(VENV)/bin/fedsocial audit $(DEMO_OUT)
	@echo "Run report:     $(DEMO_OUT)/report.html"
	@echo "Privacy report: $(DEMO_OUT)/privacy_report.html"
	@echo "Metrics:        $(DEMO_OUT)/metrics.json"

# Two workers (pytest-xdist), one torch thread each, so that the two cores are used without
# oversubscription; a file's tests stay in one worker (its module fixtures are built once).
# Tests that start servers use free ports and their own FLWR_HOME. TEST_ARGS= runs serially.
TEST_ARGS ?= -n 2 --dist loadfile
test: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q $(TEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Long measurements (hours on 2 cores): the commands behind docs/BENCHMARKS.md.
DATA_DIR ?= ../shared/datasets
bench: $(STAMP)
	$(VENV)/bin/fedsocial bench quality --dataset lastfm --data-dir $(DATA_DIR) --out runs/bench
	$(VENV)/bin/fedsocial bench quality --dataset ciao --data-dir $(DATA_DIR) --out runs/bench
	$(VENV)/bin/fedsocial bench dp-cost --config configs/lastfm.toml --data-dir $(DATA_DIR)
	$(VENV)/bin/fedsocial bench dp-cost --config configs/lastfm_dp.toml --data-dir $(DATA_DIR)

# Issue 14 (docs/BENCHMARKS.md section 9): CPU ms per DP step against the non-private and Opacus ghost
# steps, and where an epoch goes on LastFM, Ciao and a Yelp-shaped synthetic set (minutes on 2 cores).
YELP := --set data.format=synthetic --set data.n_users=17000 --set data.n_items=37000 --set data.interactions_per_user=12.2
bench-perf: $(STAMP)
	$(VENV)/bin/fedsocial bench dp-step --config configs/lastfm.toml --data-dir $(DATA_DIR) --set train.num_threads=1 \
		--batch-sizes 64 256 1024
	$(VENV)/bin/fedsocial bench profile --config configs/lastfm.toml --data-dir $(DATA_DIR) --set train.num_threads=1
	$(VENV)/bin/fedsocial bench profile --config configs/ciao.toml --data-dir $(DATA_DIR) --set train.num_threads=1
	$(VENV)/bin/fedsocial bench profile --config configs/lastfm.toml $(YELP) --set train.num_threads=1
	$(VENV)/bin/fedsocial bench calibrate

# Real-size partners (issue 14, item 5; BENCHMARKS.md 9.5): one DP federated round of 5 partners x 10k, 50k
# and 200k synthetic users (100k items), wall time and peak memory of the whole process tree (up to an hour).
bench-scale: $(STAMP)
	timeout 4200 $(VENV)/bin/fedsocial bench scale --users-per-partner 10000 50000 200000 --timeout 2400 --out runs/bench_scale

# The GPU figures (issue 14, item 7) on a machine with CUDA: LastFM and a 1M-user synthetic set.
bench-gpu: $(STAMP)
	$(PY) -m fedsocial.simulations.gpu_bench --data-dir $(DATA_DIR) --out runs/gpu_bench

# Federated vs centralized vs local-only (issue 3) and the privacy-utility grid (issue 4): hours on 2 cores.
SIM := FEDSOCIAL_SIM_CPUS=1 $(VENV)/bin/fedsocial simulate --data-dir $(DATA_DIR) --partners 5 --set train.num_threads=1
GRID := FEDSOCIAL_SIM_CPUS=1 $(PY) -m fedsocial.simulations.privacy_grid --partners 5 --set train.num_threads=1
bench-fed: $(STAMP)
	FEDSOCIAL_SIM_CPUS=1 $(PY) -m fedsocial.simulations.fed_bench --config configs/lastfm_fed.toml --data-dir $(DATA_DIR) --partners 5 \
		--set train.num_threads=1 --out runs/fed_bench_lastfm
	FEDSOCIAL_SIM_CPUS=1 $(PY) -m fedsocial.simulations.fed_bench --config configs/ciao_fed.toml --data-dir $(DATA_DIR) --partners 5 \
		--set train.num_threads=1 --out runs/fed_bench_ciao

bench-privacy: $(STAMP)
	$(GRID) --config configs/lastfm_dp.toml --data-dir $(DATA_DIR) --out runs/grid/lastfm
	# issue 12: partner scope, each partner also alone (BENCHMARKS.md section 10)
	$(GRID) --config configs/lastfm_dp.toml --data-dir $(DATA_DIR) --epsilons 8,4,2,1,inf --variants local \
		--set privacy.scope=partner --set federation.compare_alone=true --out runs/grid/lastfm_partner
	# ... two more seeds at epsilon 8 and 2, and the random partition (BENCHMARKS.md section 10.4)
	for s in 1 2; do $(GRID) --config configs/lastfm_dp.toml --data-dir $(DATA_DIR) --epsilons 8,2 --variants local \
		--no-mostpop --set privacy.scope=partner --set federation.compare_alone=true --set train.seed=$$s \
		--out runs/grid/lastfm_partner_seed$$s || exit 1; done
	$(GRID) --config configs/lastfm_dp.toml --data-dir $(DATA_DIR) --epsilons 8,2 --variants local \
		--set privacy.scope=partner --set federation.compare_alone=true --set partition.method=random \
		--out runs/grid/lastfm_partner_random
	$(GRID) --config configs/ciao_dp.toml --data-dir $(DATA_DIR) --out runs/grid/ciao
	# issue 12 item 3: the DP popularity release (BENCHMARKS.md section 10.1): alone, then in the federation
	$(PY) -m fedsocial.simulations.popularity_bench --config configs/lastfm_dp.toml --data-dir $(DATA_DIR) --partners 5 \
		--sigmas 0,2,3,4,6,8 --seeds 0,1,2
	$(GRID) --config configs/lastfm_dp.toml --data-dir $(DATA_DIR) --epsilons 8,4,2 --variants local --no-mostpop \
		--set privacy.popularity_noise_multiplier=3 --out runs/grid/lastfm_pop
	$(GRID) --config configs/lastfm_dp.toml --data-dir $(DATA_DIR) --epsilons 4,2 --variants local --no-mostpop \
		--set privacy.popularity_noise_multiplier=3 --set model.temperature=2.0 --set train.lr=0.02 --out runs/grid/lastfm_pop_t2
	$(GRID) --config configs/lastfm_dp.toml --data-dir $(DATA_DIR) --epsilons 1 --variants local --no-mostpop \
		--set privacy.popularity_noise_multiplier=6 --set model.temperature=2.0 --set train.lr=0.02 --out runs/grid/lastfm_pop_t2_eps1
	$(GRID) --config configs/ciao_dp.toml --data-dir $(DATA_DIR) --epsilons 8 --variants local --no-mostpop \
		--set privacy.popularity_noise_multiplier=3 --out runs/grid/ciao_pop
	# the learnt weight on the noisy user-item term (BENCHMARKS.md section 10.2)
	$(GRID) --config configs/lastfm_dp.toml --data-dir $(DATA_DIR) --epsilons 8,4,2 --variants local --no-mostpop \
		--set privacy.popularity_noise_multiplier=3 --set model.learned_scale=true --out runs/grid/lastfm_ls
	$(GRID) --config configs/lastfm_dp.toml --data-dir $(DATA_DIR) --epsilons 1 --variants local --no-mostpop \
		--set privacy.popularity_noise_multiplier=6 --set model.learned_scale=true --out runs/grid/lastfm_ls_eps1
	$(GRID) --config configs/ciao_dp.toml --data-dir $(DATA_DIR) --epsilons 8 --variants local --no-mostpop \
		--set privacy.popularity_noise_multiplier=3 --set model.learned_scale=true --out runs/grid/ciao_ls
	for n in 1000 10000 100000; do \
		$(GRID) --config configs/synthetic_scale.toml --epsilons 2,8,inf --variants local \
			--set data.n_users=$$((5 * n)) --set federation.local_batch_size=$$((n / 100)) \
			--out runs/grid/synthetic_$$n || exit 1; \
	done
	# distributed noise under SecAgg+ (BENCHMARKS.md section 10.7): joint scope, t = 5, seeds 0-2
	for s in 0 1 2; do \
		$(SIM) --config configs/lastfm_dp_distributed.toml --set federation.min_partners=5 --set train.seed=$$s \
			--out runs/dist/e8_s$$s || exit 1; \
		$(SIM) --config configs/lastfm_dp_distributed.toml --set federation.min_partners=5 --set train.seed=$$s \
			--set federation.rounds=40 --set federation.eval_every=40 --set train.lr=0.02 --set privacy.max_epsilon=2 \
			--set privacy.popularity_noise_multiplier=4 --out runs/dist/e2_s$$s || exit 1; \
		$(SIM) --config configs/lastfm_dp_distributed.toml --set federation.min_partners=5 --set train.seed=$$s \
			--set model.temperature=0.15 --out runs/dist/e8_t015_s$$s || exit 1; \
		$(SIM) --config configs/lastfm_dp_distributed.toml --set federation.min_partners=5 --set train.seed=$$s \
			--set model.temperature=0.15 --set privacy.scope=partner --compare-alone --out runs/dist/partner_e8_t015_s$$s \
			|| exit 1; \
		$(PY) -m fedsocial.simulations.compare_alone runs/dist/partner_e8_t015_s$$s --data-dir $(DATA_DIR) --local-control \
			|| exit 1; \
	done
	$(SIM) --config configs/lastfm_dp_distributed.toml --set privacy.scope=partner --compare-alone --out runs/dist/partner_e8

# Serving (docs/BENCHMARKS.md, serving): top-10 latency at 100k / 1M items, single and 32 concurrent
# clients on 127.0.0.1, event-to-list latency; cold-start NDCG@10 with / without the social term.
bench-serve: $(STAMP)
	timeout 3600 $(PY) -m fedsocial.simulations.serve_bench latency --items 100000 1000000 --out runs/bench_serve/latency.json
	$(PY) -m fedsocial.simulations.serve_bench layout --items 100000 1000000
	timeout 3600 $(PY) -m fedsocial.simulations.serve_bench cold-start --config configs/lastfm.toml --data-dir $(DATA_DIR) \
		--set train.num_threads=1 --out runs/bench_serve/cold_start_lastfm.json
	timeout 3600 $(PY) -m fedsocial.simulations.serve_bench cold-start --config configs/ciao.toml --data-dir $(DATA_DIR) \
		--set train.num_threads=1 --epochs 12 --out runs/bench_serve/cold_start_ciao.json

# Real deployment on loopback (SuperLink with TLS, node auth and a database; 3 SuperNodes; SecAgg+ and
# DP; refusals; a partner killed mid-round; audit). Every process is stopped by PID at the end.
e2e: $(STAMP)
	timeout 600 $(PY) -m fedsocial.simulations.e2e --work runs/e2e

# Property / fuzz tests with a longer budget than `make test` (issue 11 item 8): the hypothesis profile
# fedsocial-fuzz (tests/test_fuzz.py), 2000 examples per property instead of 30; minutes on 2 cores.
FUZZ_TESTS ?= $(wildcard tests/test_fuzz*.py)
fuzz: $(STAMP)
	FEDSOCIAL_FUZZ_PROFILE=fedsocial-fuzz $(PY) -m pytest -q -p no:cacheprovider $(FUZZ_TESTS)

clean:
	rm -rf $(VENV) runs .flwr
