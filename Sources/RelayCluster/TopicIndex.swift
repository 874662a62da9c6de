// TopicIndex: the commands of cluster mode other than sequencing.
//
// The sequencing script keeps `P:topics`, a sorted set of every topic with
// state in Redis, so that a pattern subscribe can find the matching topics by
// name (`ZRANGEBYLEX`) without `SCAN`ning the keyspace. Three small scripts
// and one command use it and the topics' keys:
//
//  * snapshot: the newest event of up to N topics with a given prefix, for the
//    first frames of a pattern subscription. One script call, so that the
//    listing and the reads are one atomic step and one round trip.
//  * sweep: removes index members whose meta key expired or was evicted, 1,000
//    per call, so that no call holds Redis for long. One relay at a time runs
//    it, the one whose `SET P:sweep <node> NX EX <interval>` succeeded.
//  * refresh: `EXPIRE` on the keys of topics that have subscribers on a relay,
//    so that a task silent for longer than `--topic-ttl` keeps its history
//    while someone watches it.
//  * probe: a `PUBLISH` on the relay's own probe channel (the subscription
//    connection's liveness check).
//
// All of them go through the publisher's command connection: a relay opens two
// connections to Redis, no more.

import NIOCore
import RESP
import RelayHub

/// The scripts of ``TopicIndex``.
enum TopicIndexScripts {
    /// KEYS[1] `P:topics`; ARGV: prefix `P`, topic prefix, limit. Lists matching members by name
    /// (`\255` ends the range: topic bytes are ASCII), and for each one with history its epoch and
    /// newest entry: `{{topic, epoch, id, line}, ...}`.
    static let snapshot = """
        local names = redis.call('ZRANGEBYLEX', KEYS[1], '[' .. ARGV[2], '[' .. ARGV[2] .. '\\255', 'LIMIT', 0, tonumber(ARGV[3]))
        local out = {}
        for _, t in ipairs(names) do
          local e = redis.call('HGET', ARGV[1] .. ':m:{' .. t .. '}', 'e')
          if e then
            local newest = redis.call('XREVRANGE', ARGV[1] .. ':h:{' .. t .. '}', '+', '-', 'COUNT', 1)[1]
            if newest then table.insert(out, {t, e, newest[1], newest[2][2]}) end
          end
        end
        return out
        """

    /// KEYS[1] `P:topics`; ARGV: prefix `P`, cursor (the last member of the previous call, or
    /// empty), count. Removes members whose meta key is gone; returns `{last member or "", removed}`.
    static let sweep = """
        local low = ARGV[2] == '' and '-' or '(' .. ARGV[2]
        local names = redis.call('ZRANGEBYLEX', KEYS[1], low, '+', 'LIMIT', 0, tonumber(ARGV[3]))
        local removed = 0
        for _, t in ipairs(names) do
          if redis.call('EXISTS', ARGV[1] .. ':m:{' .. t .. '}') == 0 then
            redis.call('ZREM', KEYS[1], t)
            removed = removed + 1
          end
        end
        if #names < tonumber(ARGV[3]) then return {'', removed} end
        return {names[#names], removed}
        """

    /// KEYS: the keys to refresh; ARGV[1] the TTL in seconds.
    static let refresh = """
        for _, k in ipairs(KEYS) do redis.call('EXPIRE', k, ARGV[1]) end
        return #KEYS
        """
}

/// The index, sweep, TTL-refresh and probe commands of one relay, on its command connection.
public struct TopicIndex: Sendable {
    /// Topics listed per snapshot: the same bound as a single relay's pattern snapshot.
    public static let snapshotLimit = HubConfiguration.defaultPatternSnapshotLimit
    /// Index members checked per sweep call.
    public static let sweepBatch = 1000
    /// Topics per refresh call.
    public static let refreshBatch = 256

    public let connection: RedisCommandConnection
    /// The prefix `P`.
    public let prefix: String

    public init(connection: RedisCommandConnection, prefix: String) {
        self.connection = connection
        self.prefix = prefix
    }

    private var indexKey: String { self.prefix + ":topics" }

    /// The newest event of up to `limit` topics whose names start with `topicPrefix`, in name order,
    /// each with its topic's epoch and its seq.
    public func snapshot(topicPrefix: String, limit: Int = TopicIndex.snapshotLimit) -> EventLoopFuture<[SequencedEvent]> {
        self.connection.send("EVAL", TopicIndexScripts.snapshot, "1", self.indexKey, self.prefix, topicPrefix, String(limit))
            .flatMapThrowing { reply in
                guard case .array(let items?) = reply else {
                    throw SequencerError.unexpectedReply(command: "EVAL snapshot", reply: "\(reply)")
                }
                return try items.map { item in
                    guard case .array(let fields?) = item, fields.count == 4,
                        case .bulkString(let topic?) = fields[0], case .bulkString(let epoch?) = fields[1],
                        case .bulkString(let id?) = fields[2], let seq = TopicSequencer.sequence(ofStreamID: id), seq > 0,
                        case .bulkString(let object?) = fields[3]
                    else {
                        throw SequencerError.unexpectedReply(command: "EVAL snapshot", reply: "\(item)")
                    }
                    return SequencedEvent(
                        topic: String(buffer: topic), epoch: String(buffer: epoch), seq: UInt64(seq), object: object)
                }
            }
    }

    /// Takes the sweeper's turn for `seconds` when no relay holds it: true when this one does now.
    public func claimSweep(node: String, seconds: Int) -> EventLoopFuture<Bool> {
        self.connection.send("SET", self.prefix + ":sweep", node, "NX", "EX", String(max(1, seconds))).map { reply in
            if case .simpleString = reply { return true }
            return false
        }
    }

    /// Sweeps the whole index, one batch per call, one call after the other.
    ///
    /// - Returns: the members removed.
    public func sweep() -> EventLoopFuture<Int> {
        self.sweep(after: "", removedSoFar: 0)
    }

    private func sweep(after cursor: String, removedSoFar: Int) -> EventLoopFuture<Int> {
        self.connection.send(
            "EVAL", TopicIndexScripts.sweep, "1", self.indexKey, self.prefix, cursor, String(Self.sweepBatch)
        ).flatMap { reply in
            guard case .array(let fields?) = reply, fields.count == 2, case .bulkString(let next?) = fields[0],
                case .integer(let removed) = fields[1]
            else {
                return self.connection.eventLoop.makeFailedFuture(
                    SequencerError.unexpectedReply(command: "EVAL sweep", reply: "\(reply)"))
            }
            let total = removedSoFar + Int(removed)
            let nextCursor = String(buffer: next)
            if nextCursor.isEmpty { return self.connection.eventLoop.makeSucceededFuture(total) }
            return self.sweep(after: nextCursor, removedSoFar: total)
        }
    }

    /// Sets the TTL of both keys of every topic in `topics` to `seconds`, ``refreshBatch`` topics
    /// per call, the calls pipelined.
    public func refresh(topics: [String], seconds: Int) -> EventLoopFuture<Void> {
        var calls: [EventLoopFuture<RESPValue>] = []
        var start = 0
        while start < topics.count {
            let batch = topics[start..<min(start + Self.refreshBatch, topics.count)]
            start += batch.count
            var arguments = ["EVAL", TopicIndexScripts.refresh, String(batch.count * 2)]
            arguments.reserveCapacity(3 + batch.count * 2 + 1)
            for topic in batch {
                arguments.append(self.prefix + ":m:{" + topic + "}")
                arguments.append(self.prefix + ":h:{" + topic + "}")
            }
            arguments.append(String(seconds))
            calls.append(self.connection.send { RESPCommand.encode(arguments, into: &$0) })
        }
        return EventLoopFuture.andAllSucceed(calls, on: self.connection.eventLoop)
    }

    /// Publishes a probe on `channel` (the subscription connection's own channel).
    public func probe(channel: String) -> EventLoopFuture<Void> {
        self.connection.send("PUBLISH", channel, "probe").map { _ in }
    }
}
