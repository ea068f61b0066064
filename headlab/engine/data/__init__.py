"""The texts the engine reads: the shipped WikiText-2 test file and prompt sets, and calibration samples drawn from them."""
