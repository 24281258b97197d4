"""PMQ: formats, calibration, the bit allocation, GPTQ, the work directory and the driver."""
