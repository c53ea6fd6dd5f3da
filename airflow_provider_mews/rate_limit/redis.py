"""The GCRA state in Redis, for workers on several hosts (CeleryExecutor, KubernetesExecutor).

The Mews connection names an Airflow connection of type ``redis`` in
``extra.rate_limit_redis_conn_id``; it is opened with the official Redis provider's
``RedisHook`` (``pip install "airflow-provider-mews[redis]"``). Each transition of
:mod:`~airflow_provider_mews.rate_limit.gcra` runs as one Lua script, atomically, on Redis's
clock (``TIME``), so hosts whose clocks disagree still share one pace. Keys expire after a
day without use.
"""

from __future__ import annotations

from typing import Any

from airflow_provider_mews.rate_limit.gcra import FACTOR_MIN, RECOVERY_STEP, STEP, Params

KEY_PREFIX = "airflow-provider-mews:gcra:"
TTL_S = 24 * 3600
#: Seconds a Redis command may take before the limiter falls back to the local one.
SOCKET_TIMEOUT_S = 2.0

# KEYS[1] = state hash. ARGV: op ("reserve" | "429" | "hold"), limit-interval (s), burst,
# period (s), then for reserve: max wait (s, or -1 for none); for 429: retry-after (s), slot (or -1).
# Mirrors gcra.reserve / gcra.on_429 / gcra.factor_at.
_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local key = KEYS[1]
local op = ARGV[1]
local interval0 = tonumber(ARGV[2])
local burst0 = tonumber(ARGV[3])
local period = tonumber(ARGV[4])
local s = redis.call('HMGET', key, 'tat', 'hold', 'factor', 'cut')
local tat = tonumber(s[1]) or 0
local hold = tonumber(s[2]) or 0
local factor = tonumber(s[3]) or 1
local cut = tonumber(s[4]) or 0
if op == 'hold' then
  return string.format('%.17g', math.max(0, hold - now))
end
local f = math.min(1, factor + RECOVERY * math.max(0, now - cut) / period)
local result
if op == 'reserve' then
  local max_wait = tonumber(ARGV[5])
  local interval = interval0 / f
  local burst = burst0
  if f < 1 then burst = 1 end
  local start = math.max(now, hold)
  local q = math.max(tat, start)
  if q > start + period * 10 then q = start end
  local slot = math.max(start, q - (burst - 1) * interval)
  if max_wait >= 0 and slot - now > max_wait then
    return {'', string.format('%.17g', now)}
  end
  tat = q + interval
  result = {string.format('%.17g', slot), string.format('%.17g', now)}
else
  local retry_after = tonumber(ARGV[5])
  local slot = tonumber(ARGV[6])
  hold = math.max(hold, now + retry_after)
  tat = math.max(tat, hold)
  result = {'0', ''}
  if slot < 0 or slot >= cut then
    factor = math.max(FACTOR_MIN, f - STEP)
    cut = now
    result = {'1', ''}
  end
end
redis.call('HSET', key, 'tat', string.format('%.17g', tat), 'hold', string.format('%.17g', hold),
  'factor', string.format('%.17g', factor), 'cut', string.format('%.17g', cut))
redis.call('EXPIRE', key, TTL)
return result
"""
LUA = (
    _LUA.replace("RECOVERY", repr(RECOVERY_STEP))
    .replace("FACTOR_MIN", repr(FACTOR_MIN))
    .replace("STEP", repr(STEP))
    .replace("TTL", str(TTL_S))
)


class RedisBackend:
    """GCRA state shared by every worker that reaches the same Redis."""

    def __init__(self, redis_conn_id: str) -> None:
        try:
            from airflow.providers.redis.hooks.redis import RedisHook
        except ImportError as exc:
            raise ImportError(
                "extra.rate_limit_redis_conn_id needs the Redis provider: "
                'pip install "airflow-provider-mews[redis]"'
            ) from exc
        self.redis_conn_id = redis_conn_id
        client: Any = RedisHook(redis_conn_id=redis_conn_id).get_conn()
        # RedisHook sets no timeouts: an unreachable Redis must fail fast, not hang a task.
        client.connection_pool.connection_kwargs.update(
            socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S
        )
        self.client = client
        self.describe = f"every worker using Redis connection '{redis_conn_id}'"
        self._script = client.register_script(LUA)

    def _run(self, key: str, *args: Any) -> Any:
        return self._script(keys=[KEY_PREFIX + key], args=[str(a) for a in args])

    def _base(self, params: Params) -> list[Any]:
        return [repr(params.interval_s), params.effective_burst, repr(params.period_s)]

    def reserve(self, key: str, params: Params, max_wait_s: float | None) -> tuple[float, float] | None:
        wait = -1.0 if max_wait_s is None else max(0.0, max_wait_s)
        slot, now = self._run(key, "reserve", *self._base(params), repr(wait))
        return None if not slot else (float(slot), float(now))

    def on_429(self, key: str, params: Params, retry_after_s: float, slot: float | None) -> bool:
        cut, _ = self._run(
            key, "429", *self._base(params), repr(retry_after_s), repr(-1.0 if slot is None else slot)
        )
        return cut in (b"1", "1")

    def hold_remaining(self, key: str) -> float:
        return float(self._run(key, "hold", "0", "1", "1"))
