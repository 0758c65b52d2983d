.PHONY: install test compare reference figures targets variants

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
	$(MAKE) variants
	python -m moe_lab figures --data $(REFERENCE) --out figures | tee $(REFERENCE)/figures.txt

figures:
	python -m moe_lab figures --data $(REFERENCE) --out figures

targets:
	python -m moe_lab targets

# Deduplication and compressed dispatch on 2 and 4 ranks, and overlap against the same paths
# without it, each measured side by side in one run (part of `reference`).
variants:
	python -m moe_lab compare --paths allgather_reducescatter,alltoall,alltoall_dedup --dispatch-dtype bfloat16,fp8 --out $(REFERENCE)/runs | tee $(REFERENCE)/variants-2r.txt
	python -m moe_lab compare --world-size 4 --paths allgather_reducescatter,alltoall,alltoall_dedup --dispatch-dtype bfloat16,fp8 --repeats 3 --out $(REFERENCE)/runs | tee $(REFERENCE)/variants-4r.txt
	python -m moe_lab compare --tokens 256 --paths allgather_reducescatter,alltoall,alltoall_dedup --overlap --repeats 10 --out $(REFERENCE)/runs | tee $(REFERENCE)/overlap-2r.txt
