"""Placeholders for absent optional callbacks, one per arity (cacheable: real source).

Kernels take every callback slot they might use; flags tell them which are real, so a
placeholder is never called. Generated arities: 1-2 vectors, 0-8 extra arguments;
:func:`mlocore._callbacks.missing_callback` falls back to generated code beyond that.
"""
import numpy as np
from numba import njit


@njit(cache=True)
def missing_vector_1_0(v0):
    return np.empty(0)


@njit(cache=True)
def missing_scalar_1_0(v0):
    return np.nan


@njit(cache=True)
def missing_vector_1_1(v0, a0):
    return np.empty(0)


@njit(cache=True)
def missing_scalar_1_1(v0, a0):
    return np.nan


@njit(cache=True)
def missing_vector_1_2(v0, a0, a1):
    return np.empty(0)


@njit(cache=True)
def missing_scalar_1_2(v0, a0, a1):
    return np.nan


@njit(cache=True)
def missing_vector_1_3(v0, a0, a1, a2):
    return np.empty(0)


@njit(cache=True)
def missing_scalar_1_3(v0, a0, a1, a2):
    return np.nan


@njit(cache=True)
def missing_vector_1_4(v0, a0, a1, a2, a3):
    return np.empty(0)


@njit(cache=True)
def missing_scalar_1_4(v0, a0, a1, a2, a3):
    return np.nan


@njit(cache=True)
def missing_vector_1_5(v0, a0, a1, a2, a3, a4):
    return np.empty(0)


@njit(cache=True)
def missing_scalar_1_5(v0, a0, a1, a2, a3, a4):
    return np.nan


@njit(cache=True)
def missing_vector_1_6(v0, a0, a1, a2, a3, a4, a5):
    return np.empty(0)


@njit(cache=True)
def missing_scalar_1_6(v0, a0, a1, a2, a3, a4, a5):
    return np.nan


@njit(cache=True)
def missing_vector_1_7(v0, a0, a1, a2, a3, a4, a5, a6):
    return np.empty(0)


@njit(cache=True)
def missing_scalar_1_7(v0, a0, a1, a2, a3, a4, a5, a6):
    return np.nan


@njit(cache=True)
def missing_vector_1_8(v0, a0, a1, a2, a3, a4, a5, a6, a7):
    return np.empty(0)


@njit(cache=True)
def missing_scalar_1_8(v0, a0, a1, a2, a3, a4, a5, a6, a7):
    return np.nan


@njit(cache=True)
def missing_vector_2_0(v0, v1):
    return np.empty(0)


@njit(cache=True)
def missing_scalar_2_0(v0, v1):
    return np.nan


@njit(cache=True)
def missing_vector_2_1(v0, v1, a0):
    return np.empty(0)


@njit(cache=True)
def missing_scalar_2_1(v0, v1, a0):
    return np.nan


@njit(cache=True)
def missing_vector_2_2(v0, v1, a0, a1):
    return np.empty(0)


@njit(cache=True)
def missing_scalar_2_2(v0, v1, a0, a1):
    return np.nan


@njit(cache=True)
def missing_vector_2_3(v0, v1, a0, a1, a2):
    return np.empty(0)


@njit(cache=True)
def missing_scalar_2_3(v0, v1, a0, a1, a2):
    return np.nan


@njit(cache=True)
def missing_vector_2_4(v0, v1, a0, a1, a2, a3):
    return np.empty(0)


@njit(cache=True)
def missing_scalar_2_4(v0, v1, a0, a1, a2, a3):
    return np.nan


@njit(cache=True)
def missing_vector_2_5(v0, v1, a0, a1, a2, a3, a4):
    return np.empty(0)


@njit(cache=True)
def missing_scalar_2_5(v0, v1, a0, a1, a2, a3, a4):
    return np.nan


@njit(cache=True)
def missing_vector_2_6(v0, v1, a0, a1, a2, a3, a4, a5):
    return np.empty(0)


@njit(cache=True)
def missing_scalar_2_6(v0, v1, a0, a1, a2, a3, a4, a5):
    return np.nan


@njit(cache=True)
def missing_vector_2_7(v0, v1, a0, a1, a2, a3, a4, a5, a6):
    return np.empty(0)


@njit(cache=True)
def missing_scalar_2_7(v0, v1, a0, a1, a2, a3, a4, a5, a6):
    return np.nan


@njit(cache=True)
def missing_vector_2_8(v0, v1, a0, a1, a2, a3, a4, a5, a6, a7):
    return np.empty(0)


@njit(cache=True)
def missing_scalar_2_8(v0, v1, a0, a1, a2, a3, a4, a5, a6, a7):
    return np.nan
