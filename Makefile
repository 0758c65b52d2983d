.PHONY: install test compare reference figures targets

REFERENCE := data/reference

install:
	python -m pip install -r requirements.txt

test:
	python -m pytest -q

compare:
	python -m moe_lab compare

# Regenerate the reference results in $(REFERENCE) and the figures made from them (about 15 minutes
# on 2 CPU cores). It starts from scratch: a finished sweep in $(REFERENCE) would be resumed, not redone.
reference:
	rm -rf $(REFERENCE) figures
	mkdir -p $(REFERENCE)
	python -m moe_lab collectives --out $(REFERENCE) | tee $(REFERENCE)/collectives.txt
	python -m moe_lab sweep --out $(REFERENCE)
	python -m moe_lab sweep --out $(REFERENCE) --tokens 16 --locality 0.5 --top-k 2,6 --dtype float32,bfloat16
	python -m moe_lab compare --tokens 64 --json --out $(REFERENCE)/runs > $(REFERENCE)/layer-gate-2r.json
	python -m moe_lab targets --out $(REFERENCE)/targets.json | tee $(REFERENCE)/targets.txt
	python -m moe_lab figures --data $(REFERENCE) --out figures | tee $(REFERENCE)/figures.txt

figures:
	python -m moe_lab figures --data $(REFERENCE) --out figures

targets:
	python -m moe_lab targets
