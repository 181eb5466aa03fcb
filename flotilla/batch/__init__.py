"""Offline batch jobs on the engine: run-batch over OpenAI batch files, the Files/Batches store, Spark
(``flotilla.batch.spark``) and Ray Data (``flotilla.batch.ray_data``)."""
