"""What a finished response owes, as the metadata Envoy's access log and rate limits read:
tokens, configured costs, budget charges (settling reserve-mode estimates), model,
error type and token latencies."""

from __future__ import annotations

from typing import Any

from extproc import budgets
from extproc.contract import Meta
from extproc.response import ResponseObserver
from extproc.runtime import Runtime
from extproc.telemetry.record import RequestRecord
from extproc.usage import cost_metadata


def end_of_response_metadata(
    runtime: Runtime, observer: ResponseObserver, model: str, backend: str, route: str, reserved: int,
    record: RequestRecord | None,
) -> dict[str, Any]:
    """Everything known at the end of the response, as metadata values.

    `reserved`: tokens charged to each reserve-mode budget up front, settled here.
    Every budget's charge key is set, 0 when nothing is owed (an error, a refusal), so
    Envoy's rate-limit filter always finds the number it charges."""
    values: dict[str, Any] = {Meta.RESPONSE_MODEL: observer.response_model}
    if observer.status >= 400:
        values[Meta.RESPONSE_ERROR_TYPE] = observer.error_type or f"http_{observer.status}"
    usage = observer.usage if 200 <= observer.status < 300 else None
    if usage is not None:
        values.update(usage.metadata())
        values.update(cost_metadata(runtime.costs, usage, model, backend, route))
    budgets.add_charges(values, runtime.charges)
    for budget in runtime.reserve_budgets:
        # Settle the up-front charge: add what the estimate missed, or give back the rest.
        actual = int(values.get(budget.cost, 0))
        values[budgets.settle_key(budget)] = max(actual - reserved, 0)
        values[budgets.refund_key(budget)] = max(reserved - actual, 0)
    if record is not None and (ttft := record.time_to_first_token) is not None:
        values[Meta.TTFT_MS] = ttft * 1000
        if (per_token := record.time_per_output_token) is not None:
            values[Meta.ITL_MS] = per_token * 1000
    return values
