"""The kvtier cache server: one cache shared by many inference processes, over ZMQ, with HTTP admin."""
