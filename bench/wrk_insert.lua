-- wrk script: RaftKV's write API, POST /insert-val with a msgpack body
--   {"op": "SET", "key": K, "value": V}
-- Keys cycle over WRK_KEYS keys (default 1000), values are WRK_VALUE_SIZE bytes (default 100).
-- Every answer is checked: HTTP 200 with body "ok"; anything else counts as an error.
--
--   WRK_KEYS=1000 WRK_VALUE_SIZE=100 wrk -t1 -c64 -d10s -s bench/wrk_insert.lua http://127.0.0.1:8080/insert-val
--
-- At the end one line "WRK_JSON {...}" carries the numbers for bench/ceilings.py.

local nkeys = tonumber(os.getenv("WRK_KEYS") or "1000")
local vsize = tonumber(os.getenv("WRK_VALUE_SIZE") or "100")
local threads = {}

local function mp_str(s)
  local n = #s
  if n < 32 then
    return string.char(0xa0 + n) .. s
  elseif n < 256 then
    return string.char(0xd9, n) .. s
  elseif n < 65536 then
    return string.char(0xda, math.floor(n / 256), n % 256) .. s
  else
    return string.char(0xdb, math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
                       math.floor(n / 256) % 256, n % 256) .. s
  end
end

local value = mp_str(string.rep("v", vsize))
local prefix = string.char(0x83) .. mp_str("op") .. mp_str("SET") .. mp_str("key")
local suffix = mp_str("value") .. value
local headers = { ["Content-Type"] = "application/msgpack" }

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  counter = 0
  errors = 0
end

function request()
  counter = counter + 1
  local key = string.format("wrk-key-%06d", (counter * 7919 + (tid or 0)) % nkeys)
  return wrk.format("POST", nil, headers, prefix .. mp_str(key) .. suffix)
end

function response(status, headers, body)
  if status ~= 200 or body ~= "ok" then
    errors = errors + 1
  end
end

function done(summary, latency, requests)
  local verify = 0
  for _, t in ipairs(threads) do
    verify = verify + (t:get("errors") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "errors_verify": %d, "socket_errors": %d, ' ..
    '"timeouts": %d, "non2xx": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, verify, e.connect + e.read + e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency.max))
end
