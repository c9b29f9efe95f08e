"""The one runner: JobSpec -> result manifest + artifacts. The CLI, the in-process worker and the
arq worker all call `run_job`; there is no second code path."""
