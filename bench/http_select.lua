-- bench/http_select.lua: a wrk script for rlsgate's HTTP front door (POST /sql).
--
--   wrk -t 2 -c 8 -d 10s -s bench/http_select.lua http://127.0.0.1:PORT \
--     -- TOKENS_FILE ACCOUNTS ROLE DATABASE
--
-- Each request is pgbench -S's query, `select abalance from pgbench_accounts
-- where aid = $1`, with a random aid in 1..ACCOUNTS, sent as the serverless
-- driver sends it. The bearer token changes with every request, in turn
-- through the tokens in TOKENS_FILE (one a line), so the proxy checks a
-- token and binds its claims for each request rather than once per
-- connection. Every response must be 200 with one row; done() prints the
-- counts on one `http_select ...` line for bench/run, and the first bad
-- response.

local thread_ids = 0
local threads = {}

function setup(thread)
  thread_ids = thread_ids + 1
  thread:set("id", thread_ids)
  table.insert(threads, thread)
end

local headers_by_token = {}
local accounts = 0
local next_token = 0
-- Read by done() through thread:get(): globals, not locals.
responses = 0
failures = 0
first_failure = ""

function init(args)
  local tokens_file, accounts_arg, role, database = args[1], args[2], args[3], args[4]
  if not (tokens_file and accounts_arg and role and database) then
    error("usage: wrk ... -s http_select.lua URL -- TOKENS_FILE ACCOUNTS ROLE DATABASE")
  end
  accounts = tonumber(accounts_arg)
  local connection = "postgresql://" .. role .. "@" .. wrk.host .. "/" .. database
  for token in io.lines(tokens_file) do
    if token ~= "" then
      -- One header table per token, built once: wrk.format only adds Host
      -- and Content-Length to it.
      table.insert(headers_by_token, {
        ["Content-Type"] = "text/plain;charset=UTF-8",
        ["Neon-Connection-String"] = connection,
        ["Neon-Raw-Text-Output"] = "true",
        ["Neon-Array-Mode"] = "true",
        ["Authorization"] = "Bearer " .. token,
      })
    end
  end
  if #headers_by_token == 0 then
    error("no tokens in " .. tokens_file)
  end
  -- Threads start at different tokens and draw different aids.
  next_token = id - 1
  math.randomseed(os.time() * 1000 + id)
end

function request()
  next_token = next_token + 1
  local headers = headers_by_token[(next_token % #headers_by_token) + 1]
  local body = '{"query":"select abalance from pgbench_accounts where aid = $1","params":["'
    .. math.random(1, accounts) .. '"]}'
  return wrk.format("POST", "/sql", headers, body)
end

function response(status, headers, body)
  responses = responses + 1
  -- One row, as the driver receives it: {"fields":[...],"rows":[["0"]],...,"rowCount":1,...}
  if status ~= 200 or not body:find('"rowCount":1,', 1, true) then
    failures = failures + 1
    if first_failure == "" then
      first_failure = status .. " " .. body:sub(1, 300):gsub("%s+", " ")
    end
  end
end

function done(summary, latency, requests)
  local responses_total, failures_total, first = 0, 0, ""
  for _, thread in ipairs(threads) do
    responses_total = responses_total + thread:get("responses")
    failures_total = failures_total + thread:get("failures")
    if first == "" then first = thread:get("first_failure") end
  end
  local e = summary.errors
  local socket_errors = e.connect + e.read + e.write + e.timeout
  io.write(string.format(
    "http_select requests=%d responses=%d failures=%d socket_errors=%d seconds=%.3f rps=%.1f p50_ms=%.2f p99_ms=%.2f\n",
    summary.requests, responses_total, failures_total, socket_errors, summary.duration / 1e6,
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000))
  if first ~= "" then
    io.write("http_select first failure: " .. first .. "\n")
  end
end
