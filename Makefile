# The workshop's jobs, and the benchmark of stage 3 against runc, crun and unshare (as root).
.PHONY: bench test tour

bench:
	bash workshop.sh setup
	.venv/bin/python bench/run.py

test:
	bash workshop.sh test

tour:
	bash workshop.sh tour
