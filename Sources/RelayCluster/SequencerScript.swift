// SequencerScript: the Lua script that gives each topic one sequence across all
// relays, and TopicSequencer, its typed caller.
//
// One script call assigns the next seq of a topic, appends the line to the
// topic's history stream, refreshes the TTLs, indexes the topic and publishes
// `<seq>:<epoch>:<line>`, all at once (issue 13, "One script does the
// sequencing"). It also keeps each relay's lines exactly once and in order with
// a per-relay counter, and starts a new epoch when the topic was written by an
// earlier Redis server run (the run_id rule). The script is the issue's, with
// one addition (ARGV[10], see `SequencerScript.source`).
//
// The script is loaded with SCRIPT LOAD, whose reply is its SHA-1, so no hash
// code is needed here; EVALSHA answers NOSCRIPT after a Redis restart or
// SCRIPT FLUSH, and the call then loads the script again and retries once.

import NIOCore
import RESP

/// The sequencing script of cluster mode.
public enum SequencerScript {
    /// The Lua source, as given in issue 13 plus one rule.
    ///
    /// KEYS: meta `P:m:{T}`, history `P:h:{T}`, index `P:topics`, node `P:n:<node>`.
    /// ARGV: mode (`pub`|`read`), topic, channel, run_id, new epoch, history, ttl, line|count,
    /// counter, first.
    ///
    /// The addition: ARGV[10], `first`, is the relay's oldest line not yet acknowledged when this
    /// one was sent (it defaults to the counter). When Redis holds no counter of this relay for
    /// this server run (the relay's first line, or the first after a Redis restart), the issue's
    /// script accepts any counter, so when the first of several pipelined lines is refused (out of
    /// memory, say) the next one lands, and the refused line, resent, is then dropped as a
    /// duplicate: lost. With `first`, such a line is answered `gap` unless it is the oldest one.
    public static let source = """
        -- KEYS: meta P:m:{T}, history P:h:{T}, index P:topics, node P:n:<node>
        -- ARGV: mode ("pub"|"read"), topic, channel, run_id, new_epoch, history, ttl, line|count, counter, first
        if ARGV[1] == 'pub' then                           -- each relay's lines: exactly once, in order
          local run, last = string.match(redis.call('GET', KEYS[4]) or '', '^(%w+) (%d+)$')
          local c = tonumber(ARGV[9])
          if run == ARGV[4] then
            local l = tonumber(last)
            if c <= l then return {'dup'} end              -- landed before, reply was lost: skip
            if c > l + 1 then return {'gap'} end           -- an earlier line failed: resend from it
          elseif c > tonumber(ARGV[10] or ARGV[9]) then
            return {'gap'}                                 -- nothing landed in this run: start at the oldest
          end
          redis.call('SET', KEYS[4], ARGV[4] .. ' ' .. ARGV[9], 'EX', 604800)
        end
        local m = redis.call('HMGET', KEYS[1], 'e', 's', 'r')
        local epoch, seq = m[1], tonumber(m[2] or '0')
        local new = false
        if not epoch or m[3] ~= ARGV[4] then               -- no state, or state from an earlier server run
          local newest = epoch and redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
          redis.call('DEL', KEYS[2])
          epoch, seq, new = ARGV[5], 0, true
          if newest then seq = 1; redis.call('XADD', KEYS[2], '1-0', 'd', newest[2][2]) end
          redis.call('HSET', KEYS[1], 'e', epoch, 's', seq, 'r', ARGV[4])
        end
        if ARGV[1] == 'pub' then
          seq = seq + 1
          redis.call('HSET', KEYS[1], 's', seq)
          redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[6], seq .. '-0', 'd', ARGV[8])
          if new or seq == 1 then redis.call('ZADD', KEYS[3], 'NX', 0, ARGV[2]) end  -- in it while the meta lives
          redis.call('PUBLISH', ARGV[3], seq .. ':' .. epoch .. ':' .. ARGV[8])
        end
        redis.call('EXPIRE', KEYS[1], ARGV[7]); redis.call('EXPIRE', KEYS[2], ARGV[7])
        if ARGV[1] == 'pub' then return {seq, epoch} end
        return {seq, epoch, redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', ARGV[8])}
        """

    /// Loads the script into `connection`'s server (`SCRIPT LOAD`) and returns its SHA-1 (hex).
    public static func load(on connection: RedisCommandConnection) -> EventLoopFuture<String> {
        connection.send("SCRIPT", "LOAD", source).flatMapThrowing { reply in
            guard case .bulkString(let sha?) = reply, sha.readableBytes == 40 else {
                throw SequencerError.unexpectedReply(command: "SCRIPT LOAD", reply: "\(reply)")
            }
            return String(buffer: sha)
        }
    }
}

/// What a `pub` call of the script did.
public enum PublishOutcome: Sendable, Hashable {
    /// The line is event `seq` of the topic in `epoch`, stored and published.
    case published(seq: Int64, epoch: String)
    /// The counter was applied before (a resend after a lost reply): nothing was done.
    case duplicate
    /// An earlier line of this relay has not landed: nothing was done; resend from that one.
    case gap
}

/// One event of a topic's history.
public struct HistoryEntry: Sendable, Hashable {
    /// The event's sequence number in its epoch.
    public var seq: Int64
    /// The event line as the emitter sent it (without `seq`).
    public var line: ByteBuffer

    public init(seq: Int64, line: ByteBuffer) {
        self.seq = seq
        self.line = line
    }
}

/// A topic's state as a `read` call of the script found it.
public struct TopicHistory: Sendable, Hashable {
    /// The newest seq (0 when the topic has no event in this epoch).
    public var seq: Int64
    /// The topic's epoch (a new one when the topic had no state or was written by an earlier server run).
    public var epoch: String
    /// The newest events, oldest first, at most the count asked for.
    public var entries: [HistoryEntry]
}

/// A reply of the script, or of `SCRIPT LOAD`, that is not of the expected shape.
public enum SequencerError: Error, Sendable, Hashable, CustomStringConvertible {
    case unexpectedReply(command: String, reply: String)

    public var description: String {
        switch self {
        case .unexpectedReply(let command, let reply):
            return "unexpected reply to \(command): \(reply.prefix(300))"
        }
    }
}

/// Calls the sequencing script on one connection, with the keys and arguments of one relay.
///
/// Calls are pipelined on the connection and applied in the order they are made. A call whose
/// `EVALSHA` meets `NOSCRIPT` loads the script again and retries once; any other error reply (for
/// example `OOM ...` when Redis is out of memory, in which case nothing was applied) fails the call
/// with ``RedisReplyError``.
public final class TopicSequencer: Sendable {
    /// The connection the calls go through.
    public let connection: RedisCommandConnection
    /// The prefix `P` of every key and channel.
    public let prefix: String
    /// The relay's node name, as in its counter key `P:n:<node>`.
    public let nodeName: String
    /// Events kept per topic (`--history`, the exact `MAXLEN` of the history stream).
    public let history: Int
    /// Seconds both keys of a topic live after a publish or a read (`--topic-ttl`).
    public let ttlSeconds: Int
    /// The server run passed to the script: the connection's `run_id` unless given.
    public let runID: String
    /// The SHA-1 of ``SequencerScript/source``, as `SCRIPT LOAD` returned it.
    public let sha: String
    /// The SHA-1 of ``SequencerScript/batchSource``; nil when it was not loaded (then
    /// ``publishBatch(_:firstUnacknowledged:)`` is not available).
    public let batchSha: String?

    private let indexKey: String
    private let nodeKey: String

    /// Creates a sequencer for a script already loaded under `sha`.
    public init(
        connection: RedisCommandConnection, sha: String, prefix: String, nodeName: String, history: Int,
        ttlSeconds: Int, runID: String? = nil, batchSha: String? = nil
    ) {
        precondition(history > 0 && ttlSeconds > 0, "history and ttl must be positive")
        self.connection = connection
        self.sha = sha
        self.batchSha = batchSha
        self.prefix = prefix
        self.nodeName = nodeName
        self.history = history
        self.ttlSeconds = ttlSeconds
        self.runID = runID ?? connection.runID
        self.indexKey = prefix + ":topics"
        self.nodeKey = prefix + ":n:" + nodeName
    }

    /// Loads the script (`SCRIPT LOAD`) and returns a sequencer that calls it.
    ///
    /// - Parameter runID: the server run to pass to the script; the connection's `run_id` unless
    ///   given (tests give another one to act as a restarted server).
    public static func load(
        on connection: RedisCommandConnection, prefix: String, nodeName: String, history: Int, ttlSeconds: Int,
        runID: String? = nil
    ) -> EventLoopFuture<TopicSequencer> {
        SequencerScript.load(on: connection).and(SequencerScript.loadBatch(on: connection)).map { sha, batchSha in
            TopicSequencer(
                connection: connection, sha: sha, prefix: prefix, nodeName: nodeName, history: history,
                ttlSeconds: ttlSeconds, runID: runID, batchSha: batchSha)
        }
    }

    /// Publishes `line` as the next event of `topic`, as this relay's line number `counter`.
    ///
    /// - Parameters:
    ///   - topic: the topic `T`.
    ///   - line: the event line as received (without `seq`).
    ///   - counter: this relay's number for the line: 1, 2, 3, ... in the order lines are sent.
    ///   - firstUnacknowledged: the relay's oldest line without a reply when this one is sent
    ///     (`counter` itself when none); see ``SequencerScript/source``.
    /// - Returns: ``PublishOutcome``; or ``RedisReplyError`` (nothing applied), ``RedisConnectionError``
    ///   (the line may or may not have landed; resend it on a new connection), ``SequencerError``.
    public func publish(
        topic: String, line: ByteBuffer, counter: UInt64, firstUnacknowledged: UInt64? = nil
    ) -> EventLoopFuture<PublishOutcome> {
        let call = ScriptCall(
            sequencer: self, topic: topic, mode: .publish(line: line, counter: counter, first: firstUnacknowledged ?? counter))
        return self.evaluate(call).flatMapThrowing { reply in
            switch reply {
            case .array(let elements?) where elements.count == 2:
                if case .integer(let seq) = elements[0], case .bulkString(let epoch?) = elements[1] {
                    return .published(seq: seq, epoch: String(buffer: epoch))
                }
            case .array(let elements?) where elements.count == 1:
                if elements[0] == .bulkString(ByteBuffer(string: "dup")) { return .duplicate }
                if elements[0] == .bulkString(ByteBuffer(string: "gap")) { return .gap }
            default:
                break
            }
            throw SequencerError.unexpectedReply(command: "EVALSHA pub", reply: "\(reply)")
        }
    }

    /// Reads `topic`: its newest seq, its epoch and its newest `count` events (oldest first),
    /// refreshing its TTL. A topic without state (or from an earlier server run) gets a new epoch
    /// here, so that everyone who reads it before its next event agrees on that epoch.
    public func read(topic: String, count: Int) -> EventLoopFuture<TopicHistory> {
        precondition(count >= 0, "count must not be negative")
        let call = ScriptCall(sequencer: self, topic: topic, mode: .read(count: count))
        return self.evaluate(call).flatMapThrowing { reply in
            guard case .array(let elements?) = reply, elements.count == 3,
                case .integer(let seq) = elements[0], case .bulkString(let epoch?) = elements[1],
                case .array(let items?) = elements[2]
            else {
                throw SequencerError.unexpectedReply(command: "EVALSHA read", reply: "\(reply)")
            }
            var entries: [HistoryEntry] = []
            entries.reserveCapacity(items.count)
            for item in items.reversed() {
                guard case .array(let pair?) = item, pair.count == 2, case .bulkString(let id?) = pair[0],
                    let entrySeq = Self.sequence(ofStreamID: id),
                    case .array(let fields?) = pair[1], fields.count == 2, case .bulkString(let line?) = fields[1]
                else {
                    throw SequencerError.unexpectedReply(command: "EVALSHA read", reply: "\(item)")
                }
                entries.append(HistoryEntry(seq: entrySeq, line: line))
            }
            return TopicHistory(seq: seq, epoch: String(buffer: epoch), entries: entries)
        }
    }

    /// `EVALSHA`; on `NOSCRIPT`, `SCRIPT LOAD` and `EVALSHA` again (pipelined), once.
    private func evaluate(_ call: ScriptCall) -> EventLoopFuture<RESPValue> {
        let connection = self.connection
        return connection.send { call.encode(into: &$0) }.flatMapError { error in
            guard let reply = error as? RedisReplyError, reply.code == "NOSCRIPT" else {
                return connection.eventLoop.makeFailedFuture(error)
            }
            // The load's own failure shows in the retry's reply, so it is not awaited.
            _ = connection.send("SCRIPT", "LOAD", SequencerScript.source)
            return connection.send { call.encode(into: &$0) }
        }
    }

    /// The seq of a stream entry ID `<seq>-0`.
    static func sequence(ofStreamID id: ByteBuffer) -> Int64? {
        var value: Int64 = 0
        var digits = 0
        for byte in id.readableBytesView {
            if byte == UInt8(ascii: "-") { break }
            guard byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9"), digits < 18 else { return nil }
            value = value * 10 + Int64(byte - UInt8(ascii: "0"))
            digits += 1
        }
        return digits > 0 ? value : nil
    }

    var keyArguments: (index: String, node: String) { (self.indexKey, self.nodeKey) }
}

/// The arguments of one script call, kept so that a call can be encoded again after `NOSCRIPT`.
private struct ScriptCall: Sendable {
    enum Mode: Sendable {
        case publish(line: ByteBuffer, counter: UInt64, first: UInt64)
        case read(count: Int)
    }

    let sha: String
    let prefix: String
    let topic: String
    let indexKey: String
    let nodeKey: String
    let runID: String
    let history: Int
    let ttl: Int
    let mode: Mode
    /// Drawn once per call, used by the script only when it starts a new epoch.
    let newEpoch: Epoch

    init(sequencer: TopicSequencer, topic: String, mode: Mode) {
        self.sha = sequencer.sha
        self.prefix = sequencer.prefix
        self.topic = topic
        (self.indexKey, self.nodeKey) = sequencer.keyArguments
        self.runID = sequencer.runID
        self.history = sequencer.history
        self.ttl = sequencer.ttlSeconds
        self.mode = mode
        self.newEpoch = Epoch.random()
    }

    /// `EVALSHA sha 4 P:m:{T} P:h:{T} P:topics P:n:<node> mode T P:t:T run epoch history ttl ...`,
    /// written without building an array or a key string.
    func encode(into buffer: inout ByteBuffer) {
        let meta = PrefixedName(prefix: self.prefix, kind: ":m:{", topic: self.topic, suffix: "}")
        let historyKey = PrefixedName(prefix: self.prefix, kind: ":h:{", topic: self.topic, suffix: "}")
        let channel = PrefixedName(prefix: self.prefix, kind: ":t:", topic: self.topic, suffix: "")
        switch self.mode {
        case .publish(let line, let counter, let first):
            RESPCommand.encode(
                "EVALSHA", self.sha, 4, meta, historyKey, self.indexKey, self.nodeKey,
                "pub", self.topic, channel, self.runID, self.newEpoch, self.history, self.ttl, line, counter, first,
                into: &buffer)
        case .read(let count):
            RESPCommand.encode(
                "EVALSHA", self.sha, 4, meta, historyKey, self.indexKey, self.nodeKey,
                "read", self.topic, channel, self.runID, self.newEpoch, self.history, self.ttl, count,
                into: &buffer)
        }
    }
}

/// A key or channel name `<prefix><kind><topic><suffix>`, written as one bulk string in place.
struct PrefixedName: RESPArgument {
    let prefix: String
    let kind: StaticString
    let topic: String
    let suffix: StaticString

    func writeRESPBulkString(into buffer: inout ByteBuffer) {
        let length = self.prefix.utf8.count + self.kind.utf8CodeUnitCount + self.topic.utf8.count
            + self.suffix.utf8CodeUnitCount
        buffer.writeStaticString("$")
        buffer.writeString(String(length))
        buffer.writeStaticString("\r\n")
        buffer.writeString(self.prefix)
        buffer.writeStaticString(self.kind)
        buffer.writeString(self.topic)
        buffer.writeStaticString(self.suffix)
        buffer.writeStaticString("\r\n")
    }
}

/// A new epoch: 12 random alphanumerics, held inline.
struct Epoch: RESPArgument, Sendable {
    private static let alphabet: StaticString = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    private var bytes: (UInt64, UInt32)

    /// Draws 12 characters uniformly from `[0-9A-Za-z]` with the system's generator.
    static func random() -> Epoch {
        var generator = SystemRandomNumberGenerator()
        var high: UInt64 = 0
        var low: UInt32 = 0
        var count = 0
        var pool: UInt64 = 0
        var left = 0
        while count < 12 {
            if left == 0 {
                pool = generator.next()
                left = 8
            }
            let byte = UInt8(truncatingIfNeeded: pool)
            pool >>= 8
            left -= 1
            // 248 = 4 × 62: rejecting the rest keeps every character equally likely.
            guard byte < 248 else { continue }
            let character = alphabet.withUTF8Buffer { $0[Int(byte % 62)] }
            if count < 8 {
                high = high << 8 | UInt64(character)
            } else {
                low = low << 8 | UInt32(character)
            }
            count += 1
        }
        return Epoch(bytes: (high, low))
    }

    /// The 12 characters.
    var text: String {
        var buffer = ByteBuffer()
        buffer.writeInteger(self.bytes.0)
        buffer.writeInteger(self.bytes.1)
        return String(buffer: buffer)
    }

    func writeRESPBulkString(into buffer: inout ByteBuffer) {
        buffer.writeStaticString("$12\r\n")
        buffer.writeInteger(self.bytes.0)
        buffer.writeInteger(self.bytes.1)
        buffer.writeStaticString("\r\n")
    }
}
