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

from airflow_provider_mews.rate_limit.gcra import (
    FACTOR_MIN,
    FRONT_MARGIN,
    FRONT_RETRY_PERIODS,
    LEARN_AFTER_WINDOWS,
    LEARNED_MARGIN,
    PEAK_DECAY,
    PEAK_MARGIN,
    RECOVERY_DELAY_PERIODS,
    RECOVERY_STEP,
    REFINE_STEP,
    STEP,
    Params,
)

KEY_PREFIX = "airflow-provider-mews:gcra:"
TTL_S = 24 * 3600
#: Seconds a Redis command may take before the limiter falls back to the local one.
SOCKET_TIMEOUT_S = 2.0

# KEYS[1] = state hash. ARGV: op ("reserve" | "429" | "hold" | "stale"), limit-interval (s), burst,
# period (s), front limit, front window (s), limit, then for reserve: max wait (s, or -1 for none);
# for 429: retry-after (s), slot (or -1); for stale: the time the slot was booked (Redis clock).
# reserve and 429 return two strings: the slot (or '') / whether it cut ('1' or '0'), and now.
# Mirrors gcra.reserve / gcra.on_429 / gcra.must_rebook / gcra.factor_at / gcra.front_allowed /
# gcra.learning_allowed / gcra.front_extra / gcra.probing, expression by expression (the same floats);
# the log of the last slots is a space-separated string, as in the SQLite file.
_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local key = KEYS[1]
local op = ARGV[1]
local interval0 = tonumber(ARGV[2])
local burst0 = tonumber(ARGV[3])
local period = tonumber(ARGV[4])
local front_limit = tonumber(ARGV[5])
local front_window = tonumber(ARGV[6])
local limit = tonumber(ARGV[7])
local learned_period = period * (1 + __LEARNED_MARGIN__)
local extra_max = 0
if front_limit > 0 then extra_max = math.max(1, math.floor(front_limit * __FRONT_MARGIN__ + 0.5)) end
local s = redis.call('HMGET', key, 'tat', 'hold', 'factor', 'cut', 'peak', 'log', 'clean')
local tat = tonumber(s[1]) or 0
local hold = tonumber(s[2]) or 0
local factor = tonumber(s[3]) or 1
local cut = tonumber(s[4]) or 0
local peak = tonumber(s[5]) or 0
local clean = tonumber(s[7]) or 0
local log = {}
for w in string.gmatch(s[6] or '', '%S+') do log[#log + 1] = tonumber(w) end
local function fmt(x) return string.format('%.17g', x) end
local function extra()
  if front_limit <= 0 then return 0 end
  local windows = math.floor(clean / front_limit)
  return math.min(extra_max, math.max(0, windows - __LEARN_AFTER__ + 1))
end
local function keep_log(keep)
  local kept = {}
  for i = 1, #log do if keep(log[i]) then kept[#kept + 1] = log[i] end end
  log = kept
end
if op == 'hold' then
  return fmt(math.max(0, hold - now))
end
if op == 'stale' then
  if now < hold or cut > tonumber(ARGV[8]) then return 1 end
  return 0
end
local periods = math.max(0, now - cut) / period
local f = factor + __RECOVERY_STEP__ * math.max(0, periods - __RECOVERY_DELAY__)
if peak > 0 then f = math.min(f, __PEAK_MARGIN__ * peak + __PEAK_DECAY__ * periods) end
f = math.min(1, math.max(factor, f))
local result
if op == 'reserve' then
  local max_wait = tonumber(ARGV[8])
  local start = math.max(now, hold)
  if #log > 0 and log[#log] > start + period * 10 then log = {} end
  local q = math.max(tat, start)
  if q > start + period * 10 then q = start end
  local slot
  local front = 0
  if front_limit > 0 and f >= 1 and (peak == 0 or now - cut >= __FRONT_RETRY__ * period) then
    front = front_limit
    slot = start
    if #log > 0 then slot = math.max(slot, log[#log]) end
    local per_window = front + extra()
    if #log >= per_window then slot = math.max(slot, log[#log - per_window + 1] + front_window) end
    if #log >= limit then slot = math.max(slot, log[#log - limit + 1] + learned_period) end
    q = slot
  else
    local interval = interval0 / f
    local burst = burst0
    if f < 1 then burst = 1 end
    slot = math.max(start, q - (burst - 1) * interval)
    q = q + interval
  end
  if max_wait >= 0 and slot - now > max_wait then
    return {'', fmt(now)}
  end
  tat = q
  if front > 0 and (cut == 0 or now - cut >= __FRONT_RETRY__ * period) then
    clean = math.min(clean + 1, front * (__LEARN_AFTER__ + extra_max))
  end
  if front_limit > 0 then
    local i = #log + 1
    while i > 1 and log[i - 1] > slot do i = i - 1 end
    table.insert(log, i, slot)
    local keep = #log - limit
    local oldest = now - learned_period
    while keep > 0 and log[keep] >= oldest do keep = keep - 1 end
    if keep > 0 then
      local kept = {}
      for j = keep + 1, #log do kept[#kept + 1] = log[j] end
      log = kept
    end
  else
    log = {}
  end
  result = {fmt(slot), fmt(now)}
else
  local retry_after = tonumber(ARGV[8])
  local slot = tonumber(ARGV[9])
  hold = math.max(hold, now + retry_after)
  tat = math.max(tat, hold)
  keep_log(function(t) return t <= now or t >= hold end)
  result = {'0', fmt(now)}
  if slot < 0 or slot >= cut then
    keep_log(function(t) return t <= now end)
    if front_limit > 0 and clean > front_limit * __LEARN_AFTER__ then
      clean = 0
      peak = 0
      cut = now
      tat = hold
    else
      clean = 0
      local step = __STEP__
      if peak > 0 and f <= factor + 1e-9 then step = __REFINE_STEP__ end
      peak = f
      factor = math.max(__FACTOR_MIN__, f - step)
      cut = now
      tat = hold
    end
    result = {'1', fmt(now)}
  end
end
local parts = {}
for i = 1, #log do parts[i] = fmt(log[i]) end
redis.call('HSET', key, 'tat', fmt(tat), 'hold', fmt(hold), 'factor', fmt(factor), 'cut', fmt(cut),
  'peak', fmt(peak), 'log', table.concat(parts, ' '), 'clean', fmt(clean))
redis.call('EXPIRE', key, __TTL__)
return result
"""
_CONSTANTS = {
    "__RECOVERY_STEP__": repr(RECOVERY_STEP),
    "__RECOVERY_DELAY__": repr(RECOVERY_DELAY_PERIODS),
    "__PEAK_MARGIN__": repr(PEAK_MARGIN),
    "__PEAK_DECAY__": repr(PEAK_DECAY),
    "__FACTOR_MIN__": repr(FACTOR_MIN),
    "__REFINE_STEP__": repr(REFINE_STEP),
    "__STEP__": repr(STEP),
    "__TTL__": str(TTL_S),
    "__FRONT_RETRY__": repr(FRONT_RETRY_PERIODS),
    "__FRONT_MARGIN__": repr(FRONT_MARGIN),
    "__LEARNED_MARGIN__": repr(LEARNED_MARGIN),
    "__LEARN_AFTER__": repr(LEARN_AFTER_WINDOWS),
}
LUA = _LUA
for _name, _value in _CONSTANTS.items():
    LUA = LUA.replace(_name, _value)


#: ARGV[2..7] for the operations that read no limit ("hold", "stale"): the op's own arguments stay at 8.
_NO_PARAMS = ("0", "1", "1", "0", "0", "1")


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
        return [
            repr(params.interval_s),
            params.effective_burst,
            repr(params.period_s),
            params.front_limit,
            repr(params.front_window_s),
            params.limit,
        ]

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
        return float(self._run(key, "hold", *_NO_PARAMS))

    def stale(self, key: str, booked_at: float) -> bool:
        return bool(int(self._run(key, "stale", *_NO_PARAMS, repr(booked_at))))
