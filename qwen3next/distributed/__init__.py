"""Tensor and expert parallelism: process groups, collectives, shard reading, rank workers."""
