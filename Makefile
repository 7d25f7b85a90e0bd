# The two commands: `make demo` and `make test`. Both install whatever is missing first.
.PHONY: demo test stop setup bench clean

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

stop:
	bash scripts/stop.sh

setup:
	bash scripts/setup.sh

bench:
	bash scripts/bench.sh

clean: stop
	rm -rf .run
