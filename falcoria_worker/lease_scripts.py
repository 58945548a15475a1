"""The Lua scripts of the leases (see redis_store.py for the states they move a lease through): each runs
atomically inside Redis, so that of several instances racing for one lease exactly one wins."""

# Prepended to the lease scripts: `now` is the caller's explicit time, or Redis's clock when it sent ''.
CLOCK = """
local function clock(given)
  if given ~= '' then
    return tonumber(given)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# KEYS: lease, leases-zset. ARGV: task_id, owner, now, ttl, message, max_attempts, retention.
# A live lease of anyone (us included: a duplicate delivery of a task we run) makes the message a
# duplicate; an expired or released one is a redelivery and counts an attempt.
CLAIM = (
    CLOCK
    + """
local hold = redis.call('HGET', KEYS[1], 'state')
local now = clock(ARGV[3])
if hold == 'held' and tonumber(redis.call('HGET', KEYS[1], 'deadline')) > now then
  return 'busy'
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') + 1
if attempts > tonumber(ARGV[6]) then
  redis.call('HSET', KEYS[1], 'state', 'poison', 'owner', ARGV[2], 'attempts', attempts)
  redis.call('HDEL', KEYS[1], 'deadline')
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  return 'poison'
end
local deadline = now + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'state', 'held', 'owner', ARGV[2], 'deadline', deadline,
           'attempts', attempts, 'message', ARGV[5])
redis.call('ZADD', KEYS[2], deadline, ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[7])
return 'claimed'
"""
)

# KEYS: leases-zset, lease keys... ARGV: owner, now, ttl, task ids (same order as the lease keys).
HEARTBEAT = (
    CLOCK
    + """
local deadline = clock(ARGV[2]) + tonumber(ARGV[3])
local lost = {}
for i = 2, #KEYS do
  local id = ARGV[i + 2]
  local owner, hold = unpack(redis.call('HMGET', KEYS[i], 'owner', 'state'))
  if owner == ARGV[1] and hold == 'held' then
    redis.call('HSET', KEYS[i], 'deadline', deadline)
    redis.call('ZADD', KEYS[1], deadline, id)
  else
    table.insert(lost, id)
  end
end
return lost
"""
)

# KEYS: lease, leases-zset, finished marker. ARGV: task_id, owner, retention. Only the owner finishes a
# lease (a poison one included), and the marker remembers who did.
RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[3])
return 1
"""

# KEYS: lease, leases-zset. ARGV: task_id, now, owner_hint ('' for none).
REQUEUE_LEASE = (
    CLOCK
    + """
local owner, hold, deadline = unpack(redis.call('HMGET', KEYS[1], 'owner', 'state', 'deadline'))
if hold ~= 'held' and hold ~= 'released' then
  return false
end
local now = clock(ARGV[2])
if tonumber(deadline) > now and (hold == 'released' or ARGV[3] == '' or owner ~= ARGV[3]) then
  return false
end
-- Released, but still indexed with a requeue deadline: if the requeue is lost (the instance dies
-- before it reaches the broker) and nobody claims the task by then, a sweep requeues it again.
local requeue_by = now + tonumber(ARGV[4])
if ARGV[5] == '1' then
  -- requeued by a stopping worker: not the task's fault, so the attempt does not count
  local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '1')
  redis.call('HSET', KEYS[1], 'attempts', math.max(attempts - 1, 0))
end
redis.call('HSET', KEYS[1], 'state', 'released', 'deadline', requeue_by)
redis.call('HDEL', KEYS[1], 'owner')
redis.call('ZADD', KEYS[2], requeue_by, ARGV[1])
return redis.call('HGET', KEYS[1], 'message')
"""
)

# KEYS: leases-zset. ARGV: owner, lease key prefix. Only start-up recovery calls it, and only the leases
# in the index (held ones) can belong to anybody.
OWNED_BY = """
local ids = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if redis.call('HGET', ARGV[2] .. id, 'owner') == ARGV[1] then
    table.insert(ids, id)
  end
end
return ids
"""

# KEYS: status, lease. ARGV: owner, status ttl, number of fields to set, then field, value pairs, then
# fields to delete. Only while `owner` holds the lease: a write of a copy that was cut off, still in the
# network when the partition heals, lands after another instance took the task over and must not win.
WRITE_STATUS_HELD = """
local owner, hold = unpack(redis.call('HMGET', KEYS[2], 'owner', 'state'))
if owner ~= ARGV[1] or hold ~= 'held' then
  return 0
end
local last = 3 + 2 * tonumber(ARGV[3])
redis.call('HSET', KEYS[1], unpack(ARGV, 4, last))
if #ARGV > last then
  redis.call('HDEL', KEYS[1], unpack(ARGV, last + 1))
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""
