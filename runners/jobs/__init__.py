"""Bulk jobs: the OpenAI Batch API's files and batches, kept in DATA_DIR and run behind interactive
traffic. `wire` is the format (limits, line checks, the objects clients read), `store` the durable
state (plain files, atomic writes, committed chunks, the runner's lease), `runner` the loop that runs
the lines through the same route handlers as HTTP, at the scheduler's lowest priority."""
