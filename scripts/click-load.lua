-- wrk script for scripts/click-load: each connection's thread walks its own part of the token
-- file (TOKENS), so every request is a distinct impression's first click.
local counter = 0
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end

function init(args)
  tokens = {}
  for line in io.lines(os.getenv("TOKENS")) do
    tokens[#tokens + 1] = line
  end
  -- Two threads (scripts/click-load): each its own half.
  i = id * math.floor(#tokens / 2)
end

function request()
  i = i + 1
  return wrk.format("GET", "/click?t=" .. tokens[(i % #tokens) + 1])
end
