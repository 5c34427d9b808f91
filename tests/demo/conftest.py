import pytest
import torch


@pytest.fixture
def restore_torch_globals():
    """Training and evaluation set torch's thread count and determinism; put them back afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
