-- wrk script for scripts/query-load: popular_ads with a random window, count and filter per
-- request (seeded per thread, so runs are repeatable), and one aggregated_count in eight.
local counter = 0
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end

local windows = {1, 5, 15, 60, 180, 360, 1440}
local counts = {10, 10, 10, 100}
local filters = {"", "", "&filter=us", "&filter=de", "&filter=mobile-user"}

function init(args)
  math.randomseed(1000 + id)
end

function request()
  local filter = filters[math.random(#filters)]
  if math.random(8) == 1 then
    local ad = math.random(100000)
    return wrk.format("GET", "/v1/ads/" .. ad .. "/aggregated_count?from=" .. os.getenv("FROM") ..
      "&to=" .. os.getenv("TO") .. filter)
  end
  return wrk.format("GET", "/v1/ads/popular_ads?count=" .. counts[math.random(#counts)] ..
    "&window=" .. windows[math.random(#windows)] .. filter)
end
