# Switchboard: the one front door. `make help` lists every target.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REQS := requirements-dev.txt common/requirements.txt common/requirements-compile.txt webapi/requirements.txt \
        websocket/requirements.txt $(wildcard microservices/*/requirements.txt)
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.DEFAULT_GOAL := help
.PHONY: help install compile run test lint fmt bench bench-rpc bench-proxy bench-profile bench-ws up down new-service clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(STAMP): $(REQS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-dev.txt
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install the pinned requirements

compile: $(STAMP) ## Compile the gateway's hot path with mypyc (common.compiled); a no-op when up to date
	@$(BIN)/python -m common.compile

run: $(STAMP) compile ## Start everything (embedded Redis unless REDIS_URL is set); Ctrl-C stops it all
	@exec $(BIN)/python -m common.devrun

test: $(STAMP) compile ## Run the whole test suite against a real embedded redis-server
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP) ## ruff (lint + format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy common webapi websocket microservices

fmt: $(STAMP) ## Format and auto-fix with ruff
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: bench-rpc bench-proxy bench-ws ## Run every benchmark (peers side by side, ratios printed)

bench-rpc: $(STAMP) ## RPC benchmark: Switchboard vs asyncredisrpc, FastStream and the raw floor
	$(BIN)/pip install --disable-pip-version-check -q -r bench/requirements.txt
	$(BIN)/python -m bench.rpc

bench-proxy: $(STAMP) ## Proxy benchmark (wrk): the gateway vs nginx, HAProxy and Python proxies
	$(BIN)/pip install --disable-pip-version-check -q -r bench/requirements.txt
	$(BIN)/python -m bench.proxy

bench-profile: $(STAMP) ## Where the gateway's CPU per request goes, next to nginx's (needs perf)
	$(BIN)/python -m bench.profile

bench-ws: $(STAMP) ## WebSocket relay benchmark: /ws/proxy/ vs nginx and Python relays, idle memory
	$(BIN)/pip install --disable-pip-version-check -q -r bench/requirements.txt
	$(BIN)/python -m bench.ws

up: ## docker compose up (build images, start the stack)
	docker compose up --build -d

down: ## docker compose down
	docker compose down

new-service: $(STAMP) ## Scaffold a worker service: make new-service NAME=foo
	@test -n "$(NAME)" || (echo "usage: make new-service NAME=foo" && exit 2)
	$(BIN)/python -m common.scaffold $(NAME)

clean: ## Remove the venv, caches and the compiled build
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .compiled
