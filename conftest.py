# Lets `pytest` import soho, data, synthetic, train and evaluate from the repository root, and holds the fixtures
# that several test files share.

import pytest

import synthetic


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A small synthetic world (48 COCO-style images, seed 0), written once per test session; tests only read it.
    A test file that needs another world defines its own `world`, which takes precedence."""
    root = str(tmp_path_factory.mktemp("world"))
    synthetic.write_synthetic_world(root, seed=0, n_images=48)
    return root
