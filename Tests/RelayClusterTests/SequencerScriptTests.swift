// The sequencing script's semantics, proven against a real redis-server: one
// gapless sequence per topic, each relay's lines exactly once and in order,
// history, TTLs and index as the data model says, the run_id rule, the pub/sub
// message format, NOSCRIPT recovery, nothing half-applied when Redis is out of
// memory, and order kept over 10,000 pipelined calls. The last test prints
// (does not assert) script calls per second with a 64-deep pipeline.

import Foundation
import NIOCore
import NIOPosix
import RESP
import Testing

@testable import RelayCluster

private func sequencer(
    _ redis: RedisCommandConnection, node: String = "a", history: Int = 5, ttl: Int = 60, runID: String? = nil
) async throws -> TopicSequencer {
    try await TopicSequencer.load(
        on: redis, prefix: "P", nodeName: node, history: history, ttlSeconds: ttl, runID: runID
    ).get()
}

private func line(_ text: String) -> ByteBuffer { ByteBuffer(string: text) }

private func isEpoch(_ epoch: String) -> Bool {
    epoch.utf8.count == 12 && epoch.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber) }
}

@Suite(.enabled(if: redisServerPath != nil, "redis-server is not installed"))
struct SequencerScriptTests {
    @Test func scriptShaIsTheSHA1OfTheSource() async throws {
        try await withRedis { _, redis in
            let sha = try await SequencerScript.load(on: redis).get()
            #expect(sha.count == 40 && sha.allSatisfy(\.isHexDigit))
            #expect(try await redis.send("SCRIPT", "EXISTS", sha).get() == .array([.integer(1)]))
        }
    }

    @Test func oneGaplessSequenceAndEachRelaysLinesExactlyOnce() async throws {
        try await withRedis { _, redis in
            let a = try await sequencer(redis, node: "a")
            var epoch: String?
            for counter in 1...20 {
                let outcome = try await a.publish(topic: "t", line: line("line \(counter)"), counter: UInt64(counter)).get()
                guard case .published(let seq, let e) = outcome else {
                    Issue.record("counter \(counter): \(outcome)")
                    return
                }
                #expect(seq == Int64(counter))
                if epoch == nil { epoch = e }
                #expect(e == epoch && isEpoch(e))
            }
            // A resend of an applied line is dropped; a line after a missing one is refused.
            #expect(try await a.publish(topic: "t", line: line("again"), counter: 20).get() == .duplicate)
            #expect(try await a.publish(topic: "t", line: line("again"), counter: 3).get() == .duplicate)
            #expect(try await a.publish(topic: "t", line: line("skips"), counter: 22).get() == .gap)
            #expect(try await redis.send("HGET", "P:m:{t}", "s").get() == bulk("20"))
            #expect(try await redis.send("XLEN", "P:h:{t}").get() == .integer(5))
            #expect(try await redis.send("GET", "P:n:a").get() == bulk("\(redis.runID) 20"))
            #expect(try await a.publish(topic: "t", line: line("21"), counter: 21).get() == .published(seq: 21, epoch: epoch!))

            // A second relay writes to the same topic: one sequence; its own counter.
            let b = try await sequencer(redis, node: "b")
            #expect(try await b.publish(topic: "t", line: line("b1"), counter: 1).get() == .published(seq: 22, epoch: epoch!))
            #expect(try await a.publish(topic: "t", line: line("22"), counter: 22).get() == .published(seq: 23, epoch: epoch!))
            #expect(try await b.publish(topic: "t", line: line("b1"), counter: 1).get() == .duplicate)
            // The counter is per relay, not per topic.
            #expect(try await b.publish(topic: "u", line: line("b2"), counter: 2).get() == .published(seq: 1, epoch: try #require(try await redis.send("HGET", "P:m:{u}", "e").get().text)))
        }
    }

    @Test func aRelaysFirstLineMustBeItsOldestUnacknowledged() async throws {
        try await withRedis { _, redis in
            let c = try await sequencer(redis, node: "c")
            // Lines 1 and 2 pipelined; line 1 did not land (say it met OOM): line 2 must not land
            // before it.
            #expect(try await c.publish(topic: "t", line: line("2"), counter: 2, firstUnacknowledged: 1).get() == .gap)
            #expect(try await redis.send("EXISTS", "P:m:{t}", "P:h:{t}", "P:n:c").get() == .integer(0))
            guard case .published(1, _) = try await c.publish(topic: "t", line: line("1"), counter: 1, firstUnacknowledged: 1).get() else {
                Issue.record("line 1 not published")
                return
            }
            guard case .published(2, _) = try await c.publish(topic: "t", line: line("2"), counter: 2, firstUnacknowledged: 1).get() else {
                Issue.record("line 2 not published")
                return
            }
            // Without firstUnacknowledged, the issue's rule: no record, any counter is accepted.
            let d = try await sequencer(redis, node: "d")
            guard case .published(3, _) = try await d.publish(topic: "t", line: line("7"), counter: 7).get() else {
                Issue.record("line 7 of d not published")
                return
            }
        }
    }

    @Test func aBatchAppliesEachLineAsTheOneLineScriptWould() async throws {
        try await withRedis { _, redis in
            let a = try await sequencer(redis, node: "a")
            func batch(_ counters: ClosedRange<Int>, first: Int? = nil) async throws -> [String] {
                let lines = counters.map { BatchLine(topic: $0 % 2 == 0 ? "even" : "odd", line: line("\($0)"), counter: UInt64($0)) }
                return try await a.publishBatch(lines, firstUnacknowledged: UInt64(first ?? counters.lowerBound)).get().map {
                    switch $0 {
                    case .published(let seq, _): return "\(seq)"
                    case .duplicate: return "dup"
                    case .gap: return "gap"
                    }
                }
            }
            // Nothing landed in this run yet: a batch must start at the oldest unacknowledged line.
            #expect(try await batch(2...3, first: 1) == ["gap", "gap"])
            #expect(try await redis.send("EXISTS", "P:n:a", "P:m:{odd}", "P:m:{even}").get() == .integer(0))
            #expect(try await batch(1...4) == ["1", "1", "2", "2"])  // per topic: odd 1, even 1, odd 2, even 2
            // A resend overlapping what landed: the landed lines are dropped, the rest apply.
            #expect(try await batch(3...6) == ["dup", "dup", "3", "3"])
            // A line after a missing one ends the call: it and every later one are refused.
            #expect(try await batch(8...9) == ["gap", "gap"])
            #expect(try await batch(7...8) == ["4", "4"])
            #expect(try await redis.send("GET", "P:n:a").get() == bulk("\(redis.runID) 8"))
            #expect(try await redis.send("HGET", "P:m:{odd}", "s").get() == bulk("4"))
            #expect(try await redis.send("XLEN", "P:h:{even}").get() == .integer(4))
            // One batch after SCRIPT FLUSH: loaded again, applied once.
            _ = try await redis.send("SCRIPT", "FLUSH").get()
            #expect(try await batch(9...10) == ["5", "5"])
            // A key of the wrong type fails the call at its line: the counter then names the lines
            // before it and that line (as the one-line script, which counts a line before touching
            // its topic), so a resend answers them `dup` and the rest apply.
            _ = try await redis.send("SET", "P:m:{bad}", "not a hash").get()
            let mixed = [11, 12, 13].map { BatchLine(topic: $0 == 12 ? "bad" : "odd", line: line("\($0)"), counter: UInt64($0)) }
            await #expect(throws: RedisReplyError.self) { try await a.publishBatch(mixed, firstUnacknowledged: 11).get() }
            #expect(try await redis.send("GET", "P:n:a").get() == bulk("\(redis.runID) 12"))
            #expect(try await redis.send("HGET", "P:m:{odd}", "s").get() == bulk("6"))
            #expect(try await batch(13...13) == ["7"])
        }
    }

    @Test func readOfATopicThatNeverHadAnEvent() async throws {
        try await withRedis { _, redis in
            let a = try await sequencer(redis)
            let empty = try await a.read(topic: "never", count: 10).get()
            #expect(empty.seq == 0 && empty.entries.isEmpty && isEpoch(empty.epoch))
            // Readers before the first event agree on the epoch, and the first event keeps it.
            #expect(try await a.read(topic: "never", count: 10).get() == empty)
            #expect(try await a.publish(topic: "never", line: line("first"), counter: 1).get() == .published(seq: 1, epoch: empty.epoch))
        }
    }

    @Test func historyTTLAndIndexFollowTheDataModel() async throws {
        try await withRedis { _, redis in
            let a = try await sequencer(redis, history: 5, ttl: 60)
            for counter in 1...12 {
                _ = try await a.publish(topic: "job:1", line: line("{\"n\":\(counter)}"), counter: UInt64(counter)).get()
            }
            // read returns the newest `count` entries, oldest first.
            let three = try await a.read(topic: "job:1", count: 3).get()
            #expect(three.seq == 12)
            #expect(three.entries == (10...12).map { HistoryEntry(seq: Int64($0), line: line("{\"n\":\($0)}")) })
            // History is trimmed to exactly --history.
            let all = try await a.read(topic: "job:1", count: 100).get()
            #expect(all.entries.map(\.seq) == [8, 9, 10, 11, 12])
            #expect(try await redis.send("XLEN", "P:h:{job:1}").get() == .integer(5))
            // Both keys expire after --topic-ttl.
            for key in ["P:m:{job:1}", "P:h:{job:1}"] {
                let ttl = try #require(try await redis.send("TTL", key).get().integer)
                #expect((55...60).contains(ttl), "\(key): TTL \(ttl)")
            }
            let nodeTTL = try #require(try await redis.send("TTL", "P:n:a").get().integer)
            #expect(nodeTTL > 604_000)
            // The index holds the topic, score 0.
            #expect(try await redis.send("ZSCORE", "P:topics", "job:1").get() == bulk("0"))
            #expect(try await redis.send("ZRANGEBYLEX", "P:topics", "[job:", "(job;").get() == .array([bulk("job:1")]))
        }
    }

    @Test func anotherServerRunStartsANewEpochCarryingTheNewestEvent() async throws {
        try await withRedis { _, redis in
            let before = try await sequencer(redis)
            for counter in 1...3 {
                _ = try await before.publish(topic: "t", line: line("e\(counter)"), counter: UInt64(counter)).get()
            }
            let oldEpoch = try await before.read(topic: "t", count: 1).get().epoch

            // The same data seen by "another server run" (as after a restart from a snapshot).
            let after = try await sequencer(redis, runID: String(repeating: "f", count: 40))
            let reset = try await after.read(topic: "t", count: 10).get()
            #expect(reset.epoch != oldEpoch && isEpoch(reset.epoch))
            #expect(reset.seq == 1 && reset.entries == [HistoryEntry(seq: 1, line: line("e3"))])
            #expect(try await redis.send("HGET", "P:m:{t}", "r").get() == bulk(String(repeating: "f", count: 40)))
            // The relay's counter from the other run does not apply in this one.
            #expect(try await after.publish(topic: "t", line: line("e4"), counter: 1).get() == .published(seq: 2, epoch: reset.epoch))

            // A publish is a touch too: back to the first run, the topic starts over again.
            let again = try await before.publish(topic: "t", line: line("e5"), counter: 4).get()
            guard case .published(let seq, let epoch) = again else {
                Issue.record("\(again)")
                return
            }
            #expect(seq == 2 && epoch != reset.epoch && epoch != oldEpoch)
            #expect(try await before.read(topic: "t", count: 10).get().entries.map { String(buffer: $0.line) } == ["e4", "e5"])
        }
    }

    @Test func publishedMessagesAreSeqEpochLine() async throws {
        try await withRedis { server, redis in
            let subscriber = try BlockingRedisClient(path: server.socketPath)
            #expect(try subscriber.call("SUBSCRIBE", "P:t:job:7") == .array([bulk("subscribe"), bulk("P:t:job:7"), .integer(1)]))
            let a = try await sequencer(redis)
            let lines = ["{\"topic\":\"job:7\",\"a\":1}", "with: colons: 2", "crlf\r\ninside"]
            var epoch = ""
            for (i, text) in lines.enumerated() {
                guard case .published(_, let e) = try await a.publish(topic: "job:7", line: line(text), counter: UInt64(i + 1)).get() else {
                    Issue.record("not published")
                    return
                }
                epoch = e
            }
            for (i, text) in lines.enumerated() {
                #expect(try subscriber.next() == .array([bulk("message"), bulk("P:t:job:7"), bulk("\(i + 1):\(epoch):\(text)")]))
            }
        }
    }

    @Test func noscriptAfterScriptFlushIsHandled() async throws {
        try await withRedis { _, redis in
            let a = try await sequencer(redis)
            guard case .published(1, let epoch) = try await a.publish(topic: "t", line: line("1"), counter: 1).get() else {
                Issue.record("not published")
                return
            }
            #expect(try await redis.send("SCRIPT", "FLUSH").get().text == "OK")
            #expect(try await a.publish(topic: "t", line: line("2"), counter: 2).get() == .published(seq: 2, epoch: epoch))
            #expect(try await a.read(topic: "t", count: 1).get().seq == 2)

            // Pipelined: every call meets NOSCRIPT, each retries in reply order, so order holds.
            #expect(try await redis.send("SCRIPT", "FLUSH").get().text == "OK")
            let outcomes = try await redis.eventLoop.flatSubmit {
                EventLoopFuture.whenAllSucceed(
                    (3...52).map { a.publish(topic: "t", line: line("\($0)"), counter: UInt64($0)) }, on: redis.eventLoop)
            }.get()
            #expect(outcomes == (3...52).map { .published(seq: Int64($0), epoch: epoch) })
        }
    }

    @Test func outOfMemoryRefusesTheScriptWithNothingApplied() async throws {
        try await withRedis { server, redis in
            let a = try await sequencer(redis)
            guard case .published(1, let epoch) = try await a.publish(topic: "t", line: line("1"), counter: 1).get() else {
                Issue.record("not published")
                return
            }
            let subscriber = try BlockingRedisClient(path: server.socketPath)
            _ = try subscriber.call("SUBSCRIBE", "P:t:t", "P:t:new")
            _ = try subscriber.next()
            func state() async throws -> [RESPValue] {
                try await [
                    redis.send("HGETALL", "P:m:{t}").get(), redis.send("XLEN", "P:h:{t}").get(),
                    redis.send("GET", "P:n:a").get(), redis.send("ZRANGE", "P:topics", "0", "-1").get(),
                    redis.send("EXISTS", "P:m:{new}", "P:h:{new}").get(),
                ]
            }
            let stateBefore = try await state()
            #expect(try await redis.send("CONFIG", "SET", "maxmemory-policy", "noeviction").get().text == "OK")
            #expect(try await redis.send("CONFIG", "SET", "maxmemory", "1").get().text == "OK")

            for (topic, counter) in [("t", UInt64(2)), ("new", UInt64(2))] {
                await #expect {
                    _ = try await a.publish(topic: topic, line: line("refused"), counter: counter).get()
                } throws: { error in
                    (error as? RedisReplyError)?.code == "OOM"
                }
            }
            #expect(try await state() == stateBefore)

            #expect(try await redis.send("CONFIG", "SET", "maxmemory", "0").get().text == "OK")
            // The relay resends from the refused line once Redis accepts writes again.
            #expect(try await a.publish(topic: "t", line: line("2"), counter: 2).get() == .published(seq: 2, epoch: epoch))
            // The subscriber saw 1 (before) and 2, nothing of the refused calls.
            #expect(try subscriber.next() == .array([bulk("message"), bulk("P:t:t"), bulk("2:\(epoch):2")]))
        }
    }

    @Test func tenThousandPipelinedPublishesKeepTheirOrder() async throws {
        try await withRedis(maximumOutstandingCommands: 16384) { _, redis in
            let a = try await sequencer(redis, history: 100)
            let count = 10_000
            let outcomes = try await redis.eventLoop.flatSubmit {
                EventLoopFuture.whenAllSucceed(
                    (1...count).map { a.publish(topic: "t", line: line("line \($0)"), counter: UInt64($0)) },
                    on: redis.eventLoop)
            }.get()
            let seqs = outcomes.compactMap { outcome -> Int64? in
                if case .published(let seq, _) = outcome { return seq }
                return nil
            }
            #expect(seqs == (1...Int64(count)).map { $0 })
            let history = try await a.read(topic: "t", count: 100).get()
            #expect(history.entries.map { String(buffer: $0.line) } == (count - 99...count).map { "line \($0)" })
            #expect(try await redis.send("GET", "P:n:a").get() == bulk("\(redis.runID) \(count)"))
        }
    }

    @Test func throughputWithA64DeepPipeline() async throws {
        try await withRedis { _, redis in
            let a = try await sequencer(redis, history: 100)
            let payload = line(#"{"topic":"task:42","state":"progress","done":"#) + line(String(repeating: "7", count: 150)) + line("}")
            // Warm up, then measure.
            var firstCounter: UInt64 = 1
            for (calls, topics, measured) in [(2_000, 100, false), (20_000, 100, true), (20_000, 1, true)] {
                let started = ContinuousClock.now
                let counter = firstCounter
                let sent = try await redis.eventLoop.flatSubmit {
                    PipelineDriver(
                        sequencer: a, calls: calls, depth: 64, topics: topics, payload: payload, firstCounter: counter
                    ).run()
                }.get()
                firstCounter += UInt64(calls)
                let elapsed = ContinuousClock.now - started
                let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
                if measured {
                    #if DEBUG
                    let build = "debug build: the client, not Redis, is the limit"
                    #else
                    let build = "release build"
                    #endif
                    print(
                        "RelayCluster throughput: \(sent) script calls (one \(payload.readableBytes)-byte line each, \(topics) topic(s)), 64-deep pipeline: \(Int(Double(sent) / seconds)) calls/s (\(build))"
                    )
                }
            }
        }
    }
}

extension ByteBuffer {
    fileprivate static func + (lhs: ByteBuffer, rhs: ByteBuffer) -> ByteBuffer {
        var sum = lhs
        sum.writeImmutableBuffer(rhs)
        return sum
    }
}

/// Keeps `depth` publishes in flight until `calls` have completed. Lives on the event loop.
private final class PipelineDriver {
    let sequencer: TopicSequencer
    let calls: Int
    let depth: Int
    let topics: [String]
    let payload: ByteBuffer
    let promise: EventLoopPromise<Int>
    var started = 0
    var completed = 0
    var failed = false

    var nextCounter: UInt64

    init(sequencer: TopicSequencer, calls: Int, depth: Int, topics: Int, payload: ByteBuffer, firstCounter: UInt64) {
        self.sequencer = sequencer
        self.calls = calls
        self.depth = depth
        self.topics = (0..<topics).map { "task:\($0)" }
        self.payload = payload
        self.promise = sequencer.connection.eventLoop.makePromise()
        self.nextCounter = firstCounter
    }

    func run() -> EventLoopFuture<Int> {
        for _ in 0..<min(self.depth, self.calls) { self.startOne() }
        return self.promise.futureResult
    }

    private func startOne() {
        let counter = self.nextCounter
        self.nextCounter += 1
        let topic = self.topics[self.started % self.topics.count]
        self.started += 1
        self.sequencer.publish(topic: topic, line: self.payload, counter: counter)
            .assumeIsolated()
            .whenComplete { result in
                if case .failure(let error) = result, !self.failed {
                    self.failed = true
                    self.promise.fail(error)
                    return
                }
                if case .success(let outcome) = result, case .published = outcome {} else if !self.failed {
                    self.failed = true
                    self.promise.fail(TestFailure(description: "unexpected \(result)"))
                    return
                }
                self.completed += 1
                if self.completed == self.calls {
                    self.promise.succeed(self.completed)
                } else if self.started < self.calls {
                    self.startOne()
                }
            }
    }
}
