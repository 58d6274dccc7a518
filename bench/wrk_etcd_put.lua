-- wrk script: etcd's v3 JSON gateway, POST /v3/kv/put {"key": base64(K), "value": base64(V)}
-- with the same keys and value sizes as wrk_insert.lua. An answer counts as correct when it is
-- HTTP 200 and carries a "header" (etcd's answer to a successful put).
--
--   WRK_KEYS=1000 WRK_VALUE_SIZE=100 wrk -t1 -c64 -d10s -s bench/wrk_etcd_put.lua http://127.0.0.1:2379/v3/kv/put

local nkeys = tonumber(os.getenv("WRK_KEYS") or "1000")
local vsize = tonumber(os.getenv("WRK_VALUE_SIZE") or "100")
local threads = {}

local b64chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

local function b64(data)
  local out = {}
  for i = 1, #data, 3 do
    local a, b, c = data:byte(i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local c1 = math.floor(n / 262144) % 64
    local c2 = math.floor(n / 4096) % 64
    local c3 = math.floor(n / 64) % 64
    local c4 = n % 64
    out[#out + 1] = b64chars:sub(c1 + 1, c1 + 1) .. b64chars:sub(c2 + 1, c2 + 1) ..
      (b and b64chars:sub(c3 + 1, c3 + 1) or "=") .. (c and b64chars:sub(c4 + 1, c4 + 1) or "=")
  end
  return table.concat(out)
end

local value = b64(string.rep("v", vsize))
local headers = { ["Content-Type"] = "application/json" }

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
  return wrk.format("POST", nil, headers, '{"key":"' .. b64(key) .. '","value":"' .. value .. '"}')
end

function response(status, headers, body)
  if status ~= 200 or not string.find(body, '"header"', 1, true) then
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
