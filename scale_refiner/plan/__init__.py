"""Memory and throughput planner: which engine, checkpointing and micro-batch a recipe should run with on a
given number of GPUs, and what it will cost.

One job per module: ``hardware`` (GPU specs), ``counts`` (parameter and buffer counts of the meta-built
refiner), ``settings`` (the engine settings the trainer supports and their command lines), ``memory`` (predicted
peak memory per GPU, broken down), ``timing`` (predicted step time: compute, exposed communication, optimiser,
data), ``search`` (every setting x the largest micro-batch that fits, the fastest marked), ``report`` (text and
JSON), ``measure`` (peak memory of real CPU steps), ``validate`` (predicted against measured), ``efficiency`` (the
compute efficiency per card, model, checkpointing mode and compile: measured defaults and the fallback rule) and
``calibrate`` (that efficiency fitted to benchmark rows).
"""
