// SequencerBatch: several lines in one call of a sequencing script.
//
// The batch script applies up to N consecutive lines of a relay in one call, each exactly as the
// one-line script would (`SequencerScript.source`): the relay's counter decides `dup` and `gap`
// line by line, and a `gap` ends the call (that line and every later one are answered `gap`).
// Measured on the test machine (docs/benchmarks.md, "Issue 13"), most of a line's cost in Redis
// is its own commands, not the call: so besides sharing the call, the batch writes the relay's
// counter once per call instead of once per line, and draws one new epoch per call (a topic
// takes it only when it starts an epoch, and epochs are compared per topic, so topics may share
// one). A command that fails midway (a key of the wrong type) is caught: the counter is set to
// name exactly the lines that landed, the failing one included as the one-line script would,
// and the call answers the error.

import NIOCore
import RESP

extension SequencerScript {
    /// The batch script.
    ///
    /// KEYS: index `P:topics`, node `P:n:<node>`, then per line: meta `P:m:{T}`, history `P:h:{T}`.
    /// ARGV: run_id, history, ttl, first, new epoch, then per line: topic, channel, line, counter.
    /// Returns one element per line: `dup`, `gap`, or `{seq, epoch}`.
    public static let batchSource = """
        local run, last = string.match(redis.call('GET', KEYS[2]) or '', '^(%w+) (%d+)$')
        local l = nil
        if run == ARGV[1] then l = tonumber(last) end
        local landed = l
        local out = {}
        local n = (#ARGV - 5) / 4
        local function apply(i, a)
          local mk, hk = KEYS[3 + i * 2], KEYS[4 + i * 2]
          local m = redis.call('HMGET', mk, 'e', 's', 'r')
          local epoch, seq = m[1], tonumber(m[2] or '0')
          local new = false
          if not epoch or m[3] ~= ARGV[1] then
            local newest = epoch and redis.call('XREVRANGE', hk, '+', '-', 'COUNT', 1)[1]
            redis.call('DEL', hk)
            epoch, seq, new = ARGV[5], 0, true
            if newest then seq = 1; redis.call('XADD', hk, '1-0', 'd', newest[2][2]) end
            redis.call('HSET', mk, 'e', epoch, 's', seq, 'r', ARGV[1])
          end
          seq = seq + 1
          redis.call('HSET', mk, 's', seq)
          redis.call('XADD', hk, 'MAXLEN', ARGV[2], seq .. '-0', 'd', ARGV[a + 2])
          if new or seq == 1 then redis.call('ZADD', KEYS[1], 'NX', 0, ARGV[a]) end
          redis.call('PUBLISH', ARGV[a + 1], seq .. ':' .. epoch .. ':' .. ARGV[a + 2])
          redis.call('EXPIRE', mk, ARGV[3]); redis.call('EXPIRE', hk, ARGV[3])
          return {seq, epoch}
        end
        local function counted()
          if landed ~= l then redis.call('SET', KEYS[2], ARGV[1] .. ' ' .. l, 'EX', 604800) end
        end
        for i = 0, n - 1 do
          local a = 6 + i * 4
          local c = tonumber(ARGV[a + 3])
          if l and c <= l then
            out[#out + 1] = 'dup'
          elseif (l and c > l + 1) or ((not l) and c > tonumber(ARGV[4])) then
            for j = i, n - 1 do out[#out + 1] = 'gap' end
            counted()
            return out
          else
            l = c
            local ok, result = pcall(apply, i, a)
            if not ok then
              counted()
              if type(result) == 'table' and result.err then return result end
              return redis.error_reply(tostring(result))
            end
            out[#out + 1] = result
          end
        end
        counted()
        return out
        """

    /// Loads the batch script and returns its SHA-1 (hex).
    public static func loadBatch(on connection: RedisCommandConnection) -> EventLoopFuture<String> {
        connection.send("SCRIPT", "LOAD", batchSource).flatMapThrowing { reply in
            guard case .bulkString(let sha?) = reply, sha.readableBytes == 40 else {
                throw SequencerError.unexpectedReply(command: "SCRIPT LOAD", reply: "\(reply)")
            }
            return String(buffer: sha)
        }
    }
}

/// One line of a batch: its topic, the line as received, and the relay's number for it.
public struct BatchLine: Sendable {
    public var topic: String
    public var line: ByteBuffer
    public var counter: UInt64

    public init(topic: String, line: ByteBuffer, counter: UInt64) {
        self.topic = topic
        self.line = line
        self.counter = counter
    }
}

extension TopicSequencer {
    /// Publishes consecutive lines of this relay in one script call.
    ///
    /// - Parameters:
    ///   - lines: consecutive counters, in order.
    ///   - firstUnacknowledged: the relay's oldest line without a reply (see the one-line script).
    /// - Returns: one outcome per line, in order; or, as ``publish(topic:line:counter:firstUnacknowledged:)``,
    ///   an error for the whole call, after which the lines before the failing one may have landed
    ///   (the counter says which: resent, they come back `duplicate`).
    public func publishBatch(_ lines: [BatchLine], firstUnacknowledged: UInt64) -> EventLoopFuture<[PublishOutcome]> {
        precondition(!lines.isEmpty, "a batch has at least one line")
        guard let batchSha else {
            return connection.eventLoop.makeFailedFuture(
                SequencerError.unexpectedReply(command: "EVALSHA batch", reply: "the batch script was not loaded"))
        }
        let encode = BatchCall(sequencer: self, sha: batchSha, lines: lines, first: firstUnacknowledged)
        let connection = self.connection
        return connection.send { encode.encode(into: &$0) }
            .flatMapError { error in
                guard let reply = error as? RedisReplyError, reply.code == "NOSCRIPT" else {
                    return connection.eventLoop.makeFailedFuture(error)
                }
                // After a restart or SCRIPT FLUSH: load it again (both scripts go together) and retry once.
                _ = connection.send("SCRIPT", "LOAD", SequencerScript.source)
                _ = connection.send("SCRIPT", "LOAD", SequencerScript.batchSource)
                return connection.send { encode.encode(into: &$0) }
            }
            .flatMapThrowing { reply in
                guard case .array(let elements?) = reply, elements.count == lines.count else {
                    throw SequencerError.unexpectedReply(command: "EVALSHA batch", reply: "\(reply)")
                }
                return try elements.map { element in
                    switch element {
                    case .array(let pair?) where pair.count == 2:
                        if case .integer(let seq) = pair[0], case .bulkString(let epoch?) = pair[1] {
                            return .published(seq: seq, epoch: String(buffer: epoch))
                        }
                    case .bulkString(let word?):
                        if word.readableBytesView.elementsEqual("dup".utf8) { return .duplicate }
                        if word.readableBytesView.elementsEqual("gap".utf8) { return .gap }
                    default:
                        break
                    }
                    throw SequencerError.unexpectedReply(command: "EVALSHA batch", reply: "\(element)")
                }
            }
    }
}

/// The arguments of one batch call, kept so that it can be encoded again after `NOSCRIPT`.
private struct BatchCall: Sendable {
    let sha: String
    let prefix: String
    let indexKey: String
    let nodeKey: String
    let runID: String
    let history: Int
    let ttl: Int
    let first: UInt64
    let lines: [BatchLine]
    /// Drawn once per call, taken by the topics that start a new epoch in it.
    let epoch: Epoch

    init(sequencer: TopicSequencer, sha: String, lines: [BatchLine], first: UInt64) {
        self.sha = sha
        self.prefix = sequencer.prefix
        (self.indexKey, self.nodeKey) = sequencer.keyArguments
        self.runID = sequencer.runID
        self.history = sequencer.history
        self.ttl = sequencer.ttlSeconds
        self.first = first
        self.lines = lines
        self.epoch = Epoch.random()
    }

    /// `EVALSHA sha <2+2n> P:topics P:n:<node> (P:m:{T} P:h:{T})... run history ttl first epoch (T P:t:T line counter)...`
    func encode(into buffer: inout ByteBuffer) {
        let n = lines.count
        RESPCommand.writeHeader(count: 3 + (2 + 2 * n) + 5 + 4 * n, into: &buffer)
        "EVALSHA".writeRESPBulkString(into: &buffer)
        sha.writeRESPBulkString(into: &buffer)
        (2 + 2 * n).writeRESPBulkString(into: &buffer)
        indexKey.writeRESPBulkString(into: &buffer)
        nodeKey.writeRESPBulkString(into: &buffer)
        for line in lines {
            PrefixedName(prefix: prefix, kind: ":m:{", topic: line.topic, suffix: "}").writeRESPBulkString(into: &buffer)
            PrefixedName(prefix: prefix, kind: ":h:{", topic: line.topic, suffix: "}").writeRESPBulkString(into: &buffer)
        }
        runID.writeRESPBulkString(into: &buffer)
        history.writeRESPBulkString(into: &buffer)
        ttl.writeRESPBulkString(into: &buffer)
        first.writeRESPBulkString(into: &buffer)
        epoch.writeRESPBulkString(into: &buffer)
        for line in lines {
            line.topic.writeRESPBulkString(into: &buffer)
            PrefixedName(prefix: prefix, kind: ":t:", topic: line.topic, suffix: "").writeRESPBulkString(into: &buffer)
            line.line.writeRESPBulkString(into: &buffer)
            line.counter.writeRESPBulkString(into: &buffer)
        }
    }
}
