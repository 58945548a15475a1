# One entry point per job; CI runs `make test` through .ci/run (scripts/test).
.PHONY: help quickstart venv check docs test test-unit test-system security-gate deb repo bench

help:
	@echo "make quickstart  install what is needed and scan two local services (Debian 12, root)"
	@echo "make test        install what the tests need and run the whole suite (root)"
	@echo "make test-unit   unit tests only (no services, no root)"
	@echo "make test-system the .deb in a booted Debian 12 container, the Ansible role (root)"
	@echo "make security-gate  systemd-analyze security of the unit (fails above 2.0)"
	@echo "make check       ruff lint and format check"
	@echo "make docs        render worker.conf, the man page's settings and the design table from config.py"
	@echo "make deb         build the Debian package (dh-virtualenv) into _build/"
	@echo "make repo        signed apt repository for Debian 12 and 13 in _build/repo (KEY=fingerprint, else a test key)"
	@echo "make bench       run the benchmarks and append results to docs/benchmarks.md"

quickstart:
	scripts/quickstart

venv:
	scripts/venv test

check: venv
	.venv/bin/ruff check falcoria_worker tests bench
	.venv/bin/ruff format --check falcoria_worker tests bench

docs:
	scripts/gen-docs

test:
	scripts/test

test-unit: venv
	.venv/bin/python -m pytest tests/unit

test-system: venv
	.venv/bin/python -m pytest tests/system

security-gate:
	scripts/security-gate

deb:
	scripts/build-deb

repo:
	scripts/make-repo $(if $(KEY),--key $(KEY))

bench:
	scripts/bench
