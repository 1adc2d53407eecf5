"""A ``module:function`` data source for tests (``--data data_source:digits``)."""
import numpy as np

from conftest import SAMPLES


def digits():
    arrays = np.load(SAMPLES / "digits.npz")
    return {"x": arrays["x"], "y": arrays["y"]}
