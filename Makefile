# The two commands a newcomer needs: `make demo` runs the appliance, `make test` runs the tests.
# Both install what they need on first use (two venvs under .venv/, see scripts/install.sh).
VENV := .venv
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.test-tools
APPLIANCE := $(VENV)/app/bin/appliance

.PHONY: demo test test-fast install browser bench clean image image-test multinode-test

$(STAMP): pyproject.toml requirements/app.lock requirements/studio.lock requirements/studio.txt scripts/install.sh
	scripts/install.sh $(abspath $(VENV)) --editable
	touch $(STAMP)

$(TEST_STAMP): scripts/install-test-tools.sh
	scripts/install-test-tools.sh
	touch $(TEST_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(APPLIANCE) demo

test: $(STAMP) $(TEST_STAMP)
	OMP_WAIT_POLICY=PASSIVE $(VENV)/app/bin/python -m pytest $(PYTEST_ARGS)

# The tests that start no appliance, train nothing and soak nothing (a few minutes): feedback while editing.
test-fast: $(STAMP) $(TEST_STAMP)
	OMP_WAIT_POLICY=PASSIVE $(VENV)/app/bin/python -m pytest -m "not heavy" $(PYTEST_ARGS)

# The container image, built and run with podman where no Docker engine or registry is at hand (root; see README).
IMAGE ?= labeling-appliance

image:
	scripts/build-image.sh $(IMAGE)

image-test: $(STAMP) image
	mkdir -p test-artifacts
	APPLIANCE_IMAGE=$(IMAGE) APPLIANCE_IMAGE_REPORT=test-artifacts/image.json $(VENV)/app/bin/python -m pytest tests/image/test_image.py $(PYTEST_ARGS)

multinode-test: $(STAMP) $(TEST_STAMP)
	OMP_WAIT_POLICY=PASSIVE $(VENV)/app/bin/python -m pytest tests/multinode $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/app/bin/python benchmarks/cold_start.py

clean:
	rm -rf $(VENV)
