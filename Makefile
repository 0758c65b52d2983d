.PHONY: install test compare

install:
	python -m pip install -r requirements.txt

test:
	python -m pytest -q

compare:
	python -m moe_lab compare
