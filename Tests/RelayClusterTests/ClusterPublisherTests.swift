// The publisher's failure semantics, proven against a real redis-server: every
// line lands exactly once and in order through lost connections, SCRIPT FLUSH,
// a hung server, a server restarted without data and a server out of memory;
// two relays on one topic make one gapless sequence; a line Redis keeps
// refusing is skipped without wedging the lines after it; a counter that fell
// behind is repaired. The queue itself is tested without Redis.

import Foundation
import NIOCore
import NIOPosix
import RESP
import Testing

@testable import RelayCluster

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// What the hooks reported, kept on the publisher's event loop.
private struct Reported {
    var reconnects = 0
    var resent = 0
    var skipped: [String] = []
    var roundTrips = 0
    var readiness: [PublisherReadiness] = []
}

/// A publisher under test and what its hooks reported.
private struct Harness {
    let publisher: ClusterPublisher
    let reported: NIOLoopBoundBox<Reported>

    var eventLoop: any EventLoop { self.publisher.eventLoop }

    init(
        endpoint: RedisEndpoint, node: String = "a", history: Int = 20_000, queueBytes: Int = 1 << 20,
        tune: (inout ClusterPublisherConfiguration) -> Void = { _ in }
    ) {
        let eventLoop = MultiThreadedEventLoopGroup.singleton.next()
        let reported = NIOLoopBoundBox.makeBoxSendingValue(Reported(), eventLoop: eventLoop)
        var hooks = ClusterPublisherHooks()
        hooks.reconnected = { reported.value.reconnects += 1 }
        hooks.resent = { reported.value.resent += $0 }
        hooks.skipped = { topic, _ in reported.value.skipped.append(topic) }
        hooks.roundTrip = { _ in reported.value.roundTrips += 1 }
        hooks.readiness = { reported.value.readiness.append($0) }
        var configuration = ClusterPublisherConfiguration(
            nodeName: node, prefix: "P", history: history, topicTTLSeconds: 600, queueBytes: queueBytes)
        configuration.stallTimeout = .milliseconds(300)
        tune(&configuration)
        self.publisher = ClusterPublisher(
            endpoint: endpoint, configuration: configuration, eventLoop: eventLoop, logger: testLogger, hooks: hooks)
        self.reported = reported
        self.publisher.start()
    }

    /// Enqueues the lines in one event-loop task, in order; returns the last result.
    @discardableResult
    func enqueue(_ lines: [(topic: String, text: String)]) async throws -> PublisherEnqueueResult {
        let publisher = self.publisher
        return try await self.eventLoop.submit {
            var last = PublisherEnqueueResult.keepReading
            for (topic, text) in lines {
                last = publisher.enqueue(topic: topic, line: ByteBuffer(string: text))
            }
            return last
        }.get()
    }

    func queuedLines() async throws -> Int {
        let publisher = self.publisher
        return try await self.eventLoop.submit { publisher.queuedLines }.get()
    }

    func readiness() async throws -> PublisherReadiness {
        let publisher = self.publisher
        return try await self.eventLoop.submit { publisher.readiness }.get()
    }

    func report() async throws -> Reported {
        let reported = self.reported
        return try await self.eventLoop.submit { reported.value }.get()
    }

    /// Waits until every line enqueued so far was acknowledged (or skipped).
    func drained(within seconds: Double = 15) async throws {
        try await waitUntil(seconds, "the queue drained") { try await self.queuedLines() == 0 }
    }

    func flush(within seconds: Int64 = 15) async throws -> Int {
        try await self.publisher.flush(deadline: .now() + .seconds(seconds)).get()
    }
}

/// Polls `condition` every 20 ms until it holds, or fails after `seconds`.
private func waitUntil(_ seconds: Double, _ what: String, _ condition: () async throws -> Bool) async throws {
    let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
    while ContinuousClock.now < deadline {
        if try await condition() { return }
        try await Task.sleep(for: .milliseconds(20))
    }
    throw TestFailure(description: "not within \(seconds) s: \(what)")
}

/// The history stream of `topic`: (seq, line) pairs, oldest first, read over a fresh socket.
private func stream(_ socketPath: String, topic: String) throws -> [(seq: Int64, line: String)] {
    let client = try BlockingRedisClient(path: socketPath)
    guard case .array(let entries?) = try client.call("XRANGE", "P:h:{\(topic)}", "-", "+") else {
        throw TestFailure(description: "XRANGE: not an array")
    }
    return try entries.map { entry in
        guard case .array(let pair?) = entry, pair.count == 2, let id = pair[0].text,
            case .array(let fields?) = pair[1], fields.count == 2, let line = fields[1].text,
            let seq = Int64(id.prefix { $0 != "-" })
        else { throw TestFailure(description: "XRANGE entry \(entry)") }
        return (seq, line)
    }
}

/// Checks that `topic`'s stream holds exactly `lines`, in order, as seq 1, 2, 3, ...
private func expectGapless(_ socketPath: String, topic: String, lines: [String]) throws {
    let entries = try stream(socketPath, topic: topic)
    #expect(entries.map(\.seq) == (0..<Int64(lines.count)).map { $0 + 1 }, "seqs of \(topic)")
    let got = entries.map(\.line)
    if got != lines {
        let missing = Set(lines).subtracting(got).count
        let duplicated = got.count - Set(got).count
        Issue.record("\(topic): \(got.count) entries for \(lines.count) lines; \(missing) missing, \(duplicated) duplicated, or out of order")
    }
}

/// The process id of the server behind `socketPath`, from `INFO server`.
private func serverPID(_ socketPath: String) throws -> pid_t {
    let client = try BlockingRedisClient(path: socketPath)
    let info = try client.call("INFO", "server").text ?? ""
    guard let line = info.split(whereSeparator: \.isNewline).first(where: { $0.hasPrefix("process_id:") }),
        let pid = pid_t(line.dropFirst("process_id:".count))
    else { throw TestFailure(description: "no process_id in INFO") }
    return pid
}

private func lines(_ topic: String, _ range: Range<Int>, tag: String = "") -> [(topic: String, text: String)] {
    range.map { (topic, "{\"topic\":\"\(topic)\",\"n\":\(tag)\($0)}") }
}

@Suite(.enabled(if: redisServerPath != nil, "redis-server is not installed"), .serialized)
struct ClusterPublisherTests {
    @Test func tenThousandLinesLandGaplessAndInOrder() async throws {
        let server = try RedisTestServer()
        defer { server.stop() }
        let harness = Harness(endpoint: server.endpoint)
        let all = lines("t", 0..<10_000)
        try await harness.enqueue(all)
        #expect(try await harness.flush() == 0)
        try expectGapless(server.socketPath, topic: "t", lines: all.map(\.text))
        let client = try BlockingRedisClient(path: server.socketPath)
        #expect(try client.call("GET", "P:n:a").text?.hasSuffix(" 10000") == true)
        let report = try await harness.report()
        #expect(report.resent == 0 && report.skipped.isEmpty && report.roundTrips > 0)
        #expect(report.readiness.first == .ready)
    }

    @Test func twoPublishersOnOneTopicMakeOneSequence() async throws {
        let server = try RedisTestServer()
        defer { server.stop() }
        let a = Harness(endpoint: server.endpoint, node: "relay-a")
        let b = Harness(endpoint: server.endpoint, node: "relay-b")
        let perRelay = 5_000
        for chunk in stride(from: 0, to: perRelay, by: 250) {
            async let sentA = a.enqueue(lines("t", chunk..<chunk + 250, tag: "\"a\""))
            async let sentB = b.enqueue(lines("t", chunk..<chunk + 250, tag: "\"b\""))
            _ = try await (sentA, sentB)
        }
        async let leftA = a.flush()
        async let leftB = b.flush()
        #expect(try await (leftA, leftB) == (0, 0))
        let entries = try stream(server.socketPath, topic: "t")
        #expect(entries.map(\.seq) == (1...Int64(2 * perRelay)).map { $0 })
        for (tag, relay) in [("\"a\"", "a"), ("\"b\"", "b")] {
            let own = entries.map(\.line).filter { $0.contains(":\(tag)") }
            #expect(own == lines("t", 0..<perRelay, tag: tag).map(\.text), "relay \(relay)'s lines in its order")
        }
    }

    @Test func killedConnectionsLoseAndDuplicateNothing() async throws {
        let server = try RedisTestServer()
        defer { server.stop() }
        let harness = Harness(endpoint: server.endpoint)
        let admin = try BlockingRedisClient(path: server.socketPath)
        let all = lines("t", 0..<10_000)
        for (index, chunk) in stride(from: 0, to: all.count, by: 200).enumerated() {
            try await harness.enqueue(Array(all[chunk..<chunk + 200]))
            if index == 10 || index == 30 {
                // The publisher's pipeline is full of calls whose replies are lost.
                try await waitUntil(5, "connected") { try await harness.readiness().isReady }
                let killed = try #require(try admin.call("CLIENT", "KILL", "TYPE", "normal").integer)
                #expect(killed >= 1)
                try await Task.sleep(for: .milliseconds(50))
            }
        }
        #expect(try await harness.flush() == 0)
        try expectGapless(server.socketPath, topic: "t", lines: all.map(\.text))
        #expect(try await harness.report().reconnects >= 2)
    }

    @Test func scriptFlushMidStreamLosesNothing() async throws {
        let server = try RedisTestServer()
        defer { server.stop() }
        let harness = Harness(endpoint: server.endpoint)
        let admin = try BlockingRedisClient(path: server.socketPath)
        let all = lines("t", 0..<6_000)
        for (index, chunk) in stride(from: 0, to: all.count, by: 300).enumerated() {
            try await harness.enqueue(Array(all[chunk..<chunk + 300]))
            if index % 5 == 2 {
                #expect(try admin.call("SCRIPT", "FLUSH").text == "OK")
            }
        }
        #expect(try await harness.flush() == 0)
        try expectGapless(server.socketPath, topic: "t", lines: all.map(\.text))
        #expect(try await harness.report().skipped.isEmpty)
    }

    @Test func aHungRedisIsNotReadyAndHoldsIngestBack() async throws {
        let server = try RedisTestServer()
        defer { server.stop() }
        let pid = try serverPID(server.socketPath)
        let harness = Harness(endpoint: server.endpoint, queueBytes: 8192)
        var all = lines("t", 0..<100)
        try await harness.enqueue(all)
        try await harness.drained()
        #expect(try await harness.readiness() == .ready)

        kill(pid, SIGSTOP)
        var resumed = false
        defer { if !resumed { kill(pid, SIGCONT) } }
        let stoppedAt = ContinuousClock.now
        // Ingest goes on until the queue is full, then is told to pause.
        var pause: EventLoopFuture<Void>?
        var next = 100
        while pause == nil, next < 2_000 {
            let line = lines("t", next..<next + 1)
            all += line
            next += 1
            if case .pause(let until) = try await harness.enqueue(line) { pause = until }
        }
        let paused = try #require(pause, "no backpressure after \(next - 100) lines")
        try await waitUntil(1.5, "not ready while Redis hangs") { try await !harness.readiness().isReady }
        try await Task.sleep(until: stoppedAt + .seconds(2), clock: .continuous)
        #expect(try await harness.queuedLines() == next - 100)

        kill(pid, SIGCONT)
        resumed = true
        try await paused.get()
        try await waitUntil(5, "ready again") { try await harness.readiness().isReady }
        let more = lines("t", next..<next + 100)
        all += more
        try await harness.enqueue(more)
        #expect(try await harness.flush() == 0)
        try expectGapless(server.socketPath, topic: "t", lines: all.map(\.text))
    }

    @Test func aRedisRestartedWithoutDataGetsTheLinesQueuedMeanwhile() async throws {
        let server = try RedisTestServer()
        defer { server.stop() }
        let harness = Harness(endpoint: server.endpoint)
        try await harness.enqueue(lines("t", 0..<100))
        try await harness.drained()
        let before = try BlockingRedisClient(path: server.socketPath)
        let oldEpoch = try #require(try before.call("HGET", "P:m:{t}", "e").text)
        let oldRun = try #require(try before.call("GET", "P:n:a").text?.split(separator: " ").first)

        let pid = try serverPID(server.socketPath)
        kill(pid, SIGKILL)
        try await waitUntil(5, "not ready without Redis") { try await !harness.readiness().isReady }
        let queued = lines("t", 100..<300)
        try await harness.enqueue(queued)
        try await Task.sleep(for: .milliseconds(400))
        #expect(try await harness.queuedLines() == 200)

        let restarted = try startRedisServer(socketPath: server.socketPath, directory: server.directory)
        defer {
            kill(restarted.processIdentifier, SIGKILL)
            restarted.waitUntilExit()
        }
        try await harness.drained()
        #expect(try await harness.readiness() == .ready)
        // No data survived: the lines read meanwhile are the topic's first events, in a new epoch.
        try expectGapless(server.socketPath, topic: "t", lines: queued.map(\.text))
        let after = try BlockingRedisClient(path: server.socketPath)
        let newEpoch = try #require(try after.call("HGET", "P:m:{t}", "e").text)
        let record = try #require(try after.call("GET", "P:n:a").text)
        #expect(newEpoch != oldEpoch)
        #expect(!record.hasPrefix(oldRun + " ") && record.hasSuffix(" 300"))
        #expect(try await harness.report().reconnects >= 1)
        #expect(try await harness.flush() == 0)
    }

    @Test func linesWaitWhileRedisIsOutOfMemory() async throws {
        let server = try RedisTestServer()
        defer { server.stop() }
        let harness = Harness(endpoint: server.endpoint)
        let admin = try BlockingRedisClient(path: server.socketPath)
        let all = lines("t", 0..<130)
        try await harness.enqueue(Array(all[0..<10]))
        try await harness.drained()
        #expect(try admin.call("CONFIG", "SET", "maxmemory-policy", "noeviction").text == "OK")
        #expect(try admin.call("CONFIG", "SET", "maxmemory", "1").text == "OK")

        try await harness.enqueue(Array(all[10..<130]))
        try await waitUntil(3, "not ready while Redis refuses writes") {
            if case .notReady(let reason) = try await harness.readiness() { return reason.contains("OOM") }
            return false
        }
        try await Task.sleep(for: .milliseconds(500))
        #expect(try await harness.queuedLines() == 120)
        #expect(try stream(server.socketPath, topic: "t").count == 10)

        #expect(try admin.call("CONFIG", "SET", "maxmemory", "0").text == "OK")
        try await harness.drained(within: 10)
        #expect(try await harness.readiness() == .ready)
        try expectGapless(server.socketPath, topic: "t", lines: all.map(\.text))
        #expect(try await harness.report().skipped.isEmpty)
        #expect(try await harness.flush() == 0)
    }

    @Test func aLineOnAKeyOfTheWrongTypeIsSkippedAndTheRestLand() async throws {
        let server = try RedisTestServer()
        defer { server.stop() }
        let harness = Harness(endpoint: server.endpoint)
        let admin = try BlockingRedisClient(path: server.socketPath)
        // Both bad topics exist first, so that the script gets past its reset (which deletes a
        // history key of any type) to the key of the wrong type.
        try await harness.enqueue([("badmeta", "first"), ("badhistory", "first")])
        try await harness.drained()
        #expect(try admin.call("SET", "P:m:{badmeta}", "not a hash").text == "OK")
        _ = try admin.call("DEL", "P:h:{badhistory}")
        #expect(try admin.call("SET", "P:h:{badhistory}", "not a stream").text == "OK")

        var good: [(topic: String, text: String)] = []
        var mixed: [(topic: String, text: String)] = []
        var bad = 0
        for n in 0..<60 {
            let line = lines(n % 2 == 0 ? "u" : "v", n..<n + 1)[0]
            good.append(line)
            mixed.append(line)
            if n % 10 == 4 {
                mixed.append(("badmeta", "bad \(n)"))
                mixed.append(("badhistory", "bad \(n)"))
                bad += 2
            }
        }
        try await harness.enqueue(mixed)
        #expect(try await harness.flush() == 0)
        for topic in ["u", "v"] {
            try expectGapless(server.socketPath, topic: topic, lines: good.filter { $0.topic == topic }.map(\.text))
        }
        let report = try await harness.report()
        #expect(report.skipped.count == bad)
        #expect(Set(report.skipped) == ["badmeta", "badhistory"])
        // Every number was used: the counter stands at the last line.
        #expect(try admin.call("GET", "P:n:a").text?.hasSuffix(" \(2 + mixed.count)") == true)
    }

    @Test func aCounterThatFellBehindIsRepaired() async throws {
        let server = try RedisTestServer()
        defer { server.stop() }
        let harness = Harness(endpoint: server.endpoint)
        let all = lines("t", 0..<15)
        try await harness.enqueue(Array(all[0..<10]))
        try await harness.drained()
        let admin = try BlockingRedisClient(path: server.socketPath)
        let record = try #require(try admin.call("GET", "P:n:a").text)
        let run = try #require(record.split(separator: " ").first)
        // As if lines 4 to 10 had been skipped without using their numbers: line 11 meets `gap`.
        #expect(try admin.call("SET", "P:n:a", "\(run) 3").text == "OK")
        try await harness.enqueue(Array(all[10..<15]))
        #expect(try await harness.flush() == 0)
        try expectGapless(server.socketPath, topic: "t", lines: all.map(\.text))
        #expect(try admin.call("GET", "P:n:a").text == "\(run) 15")
    }

    @Test func flushGivesUpAtTheDeadlineAndSaysHowManyLinesAreLeft() async throws {
        let server = try RedisTestServer()
        let endpoint = server.endpoint
        server.stop()
        let harness = Harness(endpoint: endpoint)
        try await harness.enqueue(lines("t", 0..<7))
        let started = ContinuousClock.now
        #expect(try await harness.publisher.flush(deadline: .now() + .milliseconds(300)).get() == 7)
        #expect(ContinuousClock.now - started < .seconds(2))
        guard case .refused = try await harness.enqueue(lines("t", 7..<8)) else {
            Issue.record("a line was taken after flush")
            return
        }
        #expect(try await !harness.readiness().isReady)
    }
}

/// Starts a redis-server on `socketPath` (as a restarted server, without the old one's data).
private func startRedisServer(socketPath: String, directory: URL) throws -> Process {
    guard let executable = redisServerPath else { throw TestFailure(description: "redis-server is not installed") }
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = [
        "--unixsocket", socketPath, "--port", "0", "--save", "", "--appendonly", "no", "--dir", directory.path,
        "--logfile", directory.appendingPathComponent("redis-restarted.log").path,
    ]
    process.standardOutput = FileHandle.nullDevice
    process.standardError = FileHandle.nullDevice
    try? FileManager.default.removeItem(atPath: socketPath)
    try process.run()
    for _ in 0..<200 {
        if (try? BlockingRedisClient(path: socketPath)) != nil { return process }
        usleep(50_000)
    }
    kill(process.processIdentifier, SIGKILL)
    throw TestFailure(description: "the restarted redis-server did not open \(socketPath)")
}

struct PublishQueueTests {
    @Test func linesLeaveInOrderAndCountTheirBytes() {
        var queue = PublishQueue(limit: 100)
        #expect(queue.append(topic: "t", line: ByteBuffer(string: "0123456789")) == 1)
        #expect(queue.append(topic: "t", line: ByteBuffer(string: "0123456789")) == 2)
        #expect(queue.append(topic: "t", line: ByteBuffer(string: "0123456789")) == 3)
        #expect(queue.bytes == 33 && queue.count == 3 && queue.oldestUnacknowledged == 1)
        // Done out of turn: its bytes go at once, the line when it reaches the front.
        let doneTwo = queue.markDone(2)
        #expect(doneTwo && queue.bytes == 22 && queue.count == 3)
        let doneTwoAgain = queue.markDone(2)
        let doneOne = queue.markDone(1)
        #expect(!doneTwoAgain && doneOne)
        #expect(queue.count == 1 && queue.oldestUnacknowledged == 3)
        let doneGone = queue.markDone(1)
        let doneUnknown = queue.markDone(9)
        #expect(!doneGone && !doneUnknown)
    }

    @Test func roundsSendFromTheOldestLineNotDone() {
        var queue = PublishQueue(limit: 1000)
        for n in 1...5 { _ = queue.append(topic: "t", line: ByteBuffer(string: "\(n)")) }
        queue.rewind()
        var sent: [UInt64] = []
        while let next = queue.nextToSend() { sent.append(next.line.counter) }
        #expect(sent == [1, 2, 3, 4, 5] && !queue.hasUnsent)
        queue.markDone(1)
        queue.markDone(3)
        queue.rewind()
        let again = [queue.nextToSend(), queue.nextToSend(), queue.nextToSend()]
        #expect(again.map { $0?.line.counter } == [2, 4, 5] && again.allSatisfy { $0?.resend == true })
        _ = queue.append(topic: "t", line: ByteBuffer(string: "6"))
        #expect(queue.hasUnsent)
        #expect(queue.nextToSend()?.resend == false)
    }

    @Test func fullAtTheLimitRoomBelowHalf() {
        var queue = PublishQueue(limit: 40)
        for _ in 0..<4 { _ = queue.append(topic: "t", line: ByteBuffer(string: "123456789")) }
        #expect(queue.isFull && !queue.hasRoom)
        queue.markDone(1)
        #expect(!queue.isFull && !queue.hasRoom)
        queue.markDone(2)
        #expect(!queue.hasRoom)
        queue.markDone(3)
        #expect(queue.hasRoom)
    }
}
