// IngestHandlerTests: the ingest handler in an EmbeddedChannel. However the kernel splits a
// stream into reads, the relay publishes the same lines and writes the same answers, with the
// same line numbers, as judging the whole input split on `\n` (docs/protocol.md, section 3).

import NIOCore
import NIOEmbedded
import RelayHub
import Testing

@_spi(Fuzzing) @testable import RelayServer

private func bytes(_ text: String) -> [UInt8] { Array(text.utf8) }

/// Streams that between them hold every kind of line the handler tells apart.
private enum Streams {
    /// Good lines, multi-byte UTF-8 (2, 3 and 4 bytes) in topics' content, a CRLF line.
    static let good = bytes(
        "{\"topic\":\"task:1\",\"type\":\"progress\",\"progress\":5}\n"
            + "{\"topic\":\"a\",\"m\":\"é€😀\"}\r\n"
            + "{\"m\":\"ü\",\"topic\":\"b/c@d=e\"}\n")

    /// Every rejection reason the parser gives, and blank lines of each kind (no answer).
    static let bad: [UInt8] =
        bytes("not json\n")
        + bytes("\n")
        + bytes("[1,2]\n")
        + bytes(" \t \r\n")
        + bytes("{\"type\":\"x\"}\n")
        + bytes("{\"topic\":\"has space\"}\n")
        + bytes("{\"topic\":\"a\",\"type\":5}\n")
        + bytes("{\"topic\":\"a\",\"topic\":\"b\"}\n")
        + bytes("{\"topic\":\"a\",\"seq\":1}\n")
        + bytes("{\"topic\":\"a\",\"m\":\"") + [0xC3, 0x28] + bytes("\"}\n")
        + bytes("\r\n")
        + bytes("{\"topic\":\"ok\",\"m\":\"ß\"}\n")

    /// The answers to `bad`, written by hand: the reference itself is checked against them.
    static let badAnswers =
        "{\"error\":\"invalid_json\",\"line\":1}\n"
        + "{\"error\":\"not_object\",\"line\":3}\n"
        + "{\"error\":\"missing_topic\",\"line\":5}\n"
        + "{\"error\":\"invalid_topic\",\"line\":6}\n"
        + "{\"error\":\"invalid_type\",\"line\":7}\n"
        + "{\"error\":\"duplicate_field\",\"line\":8}\n"
        + "{\"error\":\"reserved_field\",\"line\":9}\n"
        + "{\"error\":\"invalid_utf8\",\"line\":10}\n"

    /// With a 32-byte limit: a line far over it, lines at it and one byte past it (with and
    /// without a `\r`), and a good line after each.
    static let longLimit = 32
    static let long: [UInt8] =
        bytes("{\"topic\":\"t\",\"pad\":\"" + String(repeating: "x", count: 80) + "\"}\n")
        + bytes("{\"topic\":\"t\"}\n")
        + bytes("{\"topic\":\"t\",\"pad\":\"" + String(repeating: "y", count: 10) + "\"}\n")  // 32 bytes
        + bytes("{\"topic\":\"t\",\"pad\":\"" + String(repeating: "y", count: 10) + "\"}\r\n")  // 32 + CR
        + bytes("{\"topic\":\"t\",\"pad\":\"" + String(repeating: "y", count: 11) + "\"}\n")  // 33
        + bytes("{\"topic\":\"t\",\"pad\":\"" + String(repeating: "y", count: 11) + "\"}\r\n")  // 33 + CR
        + bytes(String(repeating: " ", count: 40) + "\n")  // blank, but over the limit
        + bytes("{\"topic\":\"u\"}\n")

    /// Complete lines, then an unfinished one that must never be published.
    static let partialTail = bytes("{\"topic\":\"a\"}\nbad\n{\"topic\":\"b\",\"m\":\"€\"}")

    /// An unfinished last line already over the limit: answered once, never published.
    static let longTail = bytes("{\"topic\":\"a\"}\n{\"topic\":\"b\",\"pad\":\"" + String(repeating: "z", count: 40))

    static let all: [(name: String, stream: [UInt8], limit: Int)] = [
        ("good", good, 1024), ("bad", bad, 1024), ("long", long, longLimit), ("partialTail", partialTail, 1024),
        ("longTail", longTail, longLimit),
    ]
}

/// Feeds `stream` in the reads `cuts` makes of it and returns what the relay did, checking the
/// bound on held bytes after every read.
private func outcome(
    of stream: [UInt8], cuts: [Int], limit: Int, grants: GrantSet? = nil
) throws -> (IngestReference.Outcome, batches: [[FakeHub.Published]]) {
    let connection = try IngestConnection(maxEventBytes: limit, grants: grants)
    var start = 0
    for end in cuts + [stream.count] where end > start {
        try connection.read(stream[start..<end])
        start = end
        // What waits for the next read is at most the limit and a `\r`.
        #expect(connection.handler.bufferedBytes <= limit + 1)
    }
    let answers = try connection.answers()
    _ = try connection.channel.finish()
    return (.init(published: connection.hub.published, answers: answers), connection.hub.batches)
}

@Suite struct IngestSplitTests {
    @Test func theReferenceAnswersTheBadStreamAsWrittenByHand() {
        let expected = IngestReference.outcome(of: Streams.bad, maxEventBytes: 1024)
        #expect(expected.answers == Streams.badAnswers)
        #expect(expected.published == [.init(topic: "ok", object: bytes("{\"topic\":\"ok\",\"m\":\"ß\"}"))])
    }

    @Test func theReferenceAnswersTheLongStreamAsWrittenByHand() {
        let expected = IngestReference.outcome(of: Streams.long, maxEventBytes: Streams.longLimit)
        #expect(
            expected.answers
                == "{\"error\":\"line_too_long\",\"line\":1}\n{\"error\":\"line_too_long\",\"line\":5}\n"
                + "{\"error\":\"line_too_long\",\"line\":6}\n{\"error\":\"line_too_long\",\"line\":7}\n")
        #expect(expected.published.map(\.topic) == ["t", "t", "t", "u"])
    }

    @Test(arguments: Streams.all.map(\.name))
    func oneReadGivesTheReference(name: String) throws {
        let (_, stream, limit) = Streams.all.first { $0.name == name }!
        let (got, batches) = try outcome(of: stream, cuts: [], limit: limit)
        #expect(got == IngestReference.outcome(of: stream, maxEventBytes: limit))
        // The good lines of one read are one batch.
        #expect(batches.count <= 1)
    }

    @Test(arguments: Streams.all.map(\.name))
    func everySplitInTwoGivesTheReference(name: String) throws {
        let (_, stream, limit) = Streams.all.first { $0.name == name }!
        let expected = IngestReference.outcome(of: stream, maxEventBytes: limit)
        for cut in 0...stream.count {
            let (got, batches) = try outcome(of: stream, cuts: [cut], limit: limit)
            #expect(got == expected, "cut at \(cut)")
            #expect(batches.count <= 2 && batches.allSatisfy { !$0.isEmpty }, "cut at \(cut)")
        }
    }

    @Test(arguments: ["good", "partialTail", "longTail"])
    func everySplitInThreeGivesTheReference(name: String) throws {
        let (_, stream, limit) = Streams.all.first { $0.name == name }!
        let expected = IngestReference.outcome(of: stream, maxEventBytes: limit)
        for first in 0...stream.count {
            for second in first...stream.count {
                let (got, _) = try outcome(of: stream, cuts: [first, second], limit: limit)
                #expect(got == expected, "cuts at \(first), \(second)")
            }
        }
    }

    @Test(arguments: Streams.all.map(\.name))
    func oneByteAtATimeGivesTheReference(name: String) throws {
        let (_, stream, limit) = Streams.all.first { $0.name == name }!
        let (got, _) = try outcome(of: stream, cuts: Array(0..<stream.count), limit: limit)
        #expect(got == IngestReference.outcome(of: stream, maxEventBytes: limit))
    }

    @Test func aTopicNoGrantCoversIsAnsweredAndNotPublished() throws {
        let stream = bytes("{\"topic\":\"mine:1\"}\n{\"topic\":\"theirs:1\"}\n{\"topic\":\"mine:2\"}\n")
        let grants = GrantSet(["mine:*"])
        let expected = IngestReference.outcome(of: stream, maxEventBytes: 1024, grants: grants)
        #expect(expected.answers == "{\"error\":\"forbidden_topic\",\"line\":2}\n")
        for cut in 0...stream.count {
            let (got, _) = try outcome(of: stream, cuts: [cut], limit: 1024, grants: grants)
            #expect(got == expected, "cut at \(cut)")
        }
    }
}

@Suite struct IngestLineBoundTests {
    @Test func aLongLineIsAnsweredOnceAndSkippedToItsNewline() throws {
        let connection = try IngestConnection(maxEventBytes: 32)
        // 200 bytes of one line in 10-byte reads: rejected once, the moment it is over the limit.
        let long = bytes("{\"topic\":\"t\",\"pad\":\"" + String(repeating: "x", count: 180))
        var answers = ""
        for start in stride(from: 0, to: long.count, by: 10) {
            try connection.read(long[start..<min(start + 10, long.count)])
            answers += try connection.answers()
            #expect(connection.handler.bufferedBytes <= 33)
        }
        #expect(answers == IngestReference.answer(.tooLong, 1))
        // Its end, and the next line, which is line 2 and published.
        try connection.read(bytes("\"}\n{\"topic\":\"next\"}\n"))
        #expect(try connection.answers() == "")
        #expect(connection.hub.published == [.init(topic: "next", object: bytes("{\"topic\":\"next\"}"))])
        try connection.read(bytes("nope\n"))
        #expect(try connection.answers() == IngestReference.answer(.invalidJSON, 3))
    }

    @Test func aLineAtTheLimitWithItsCarriageReturnIsHeldWhole() throws {
        let connection = try IngestConnection(maxEventBytes: 32)
        let line = bytes("{\"topic\":\"t\",\"pad\":\"" + String(repeating: "y", count: 10) + "\"}\r")
        #expect(line.count == 33)
        try connection.read(line)
        #expect(connection.handler.bufferedBytes == 33)
        #expect(try connection.answers() == "")
        try connection.read(bytes("\n"))
        #expect(connection.hub.published.count == 1)
        #expect(connection.handler.bufferedBytes == 0)
    }

    @Test func anAnswerIsDroppedWhileTheConnectionTakesNoWrites() throws {
        let connection = try IngestConnection()
        connection.channel.isWritable = false
        try connection.read(bytes("bad\n{\"topic\":\"a\"}\n"))
        #expect(try connection.answers() == "")
        #expect(connection.hub.published.count == 1)
        connection.channel.isWritable = true
        try connection.read(bytes("worse\n"))
        // Dropped answers still count their lines.
        #expect(try connection.answers() == IngestReference.answer(.invalidJSON, 3))
    }
}

@Suite struct IngestEndOfInputTests {
    @Test func endOfInputDropsTheUnfinishedLineAndCloses() throws {
        let connection = try IngestConnection()
        try connection.read(Streams.partialTail)
        #expect(connection.handler.bufferedBytes > 0)
        connection.endOfInput()
        #expect(connection.hub.published.map(\.topic) == ["a"])
        #expect(try connection.answers() == IngestReference.answer(.invalidJSON, 2))
        #expect(connection.handler.bufferedBytes == 0)
        // Its answers are written (here at once), then the connection is closed.
        connection.channel.embeddedEventLoop.run()
        #expect(!connection.channel.isActive)
        _ = try connection.channel.finish(acceptAlreadyClosed: true)
    }

    @Test func endOfInputInsideALongLineAnswersNothingMore() throws {
        let connection = try IngestConnection(maxEventBytes: 32)
        try connection.read(Streams.longTail)
        #expect(try connection.answers() == IngestReference.answer(.tooLong, 2))
        connection.endOfInput()
        #expect(try connection.answers() == "")
        #expect(connection.hub.published.map(\.topic) == ["a"])
        connection.channel.embeddedEventLoop.run()
        #expect(!connection.channel.isActive)
        _ = try connection.channel.finish(acceptAlreadyClosed: true)
    }
}

@Suite struct IngestBudgetInHandlerTests {
    @Test func aSpentBudgetHoldsTheReadUntilItsBatchIsDelivered() throws {
        let hub = FakeHub()
        hub.hold()
        let connection = try IngestConnection(budgetBytes: 20, hub: hub)
        connection.channel.read()
        #expect(connection.counter.reads == 1)
        // 12 + 12 object bytes: over the 20-byte budget once published.
        try connection.read(bytes("{\"topic\":\"a\"}\n{\"topic\":\"b\"}\n"))
        #expect(connection.budget.value.inFlight == 26)
        #expect(connection.budget.value.isSpent)
        connection.channel.read()
        connection.channel.read()
        #expect(connection.counter.reads == 1, "no read while the budget is spent")
        hub.release()
        #expect(connection.counter.reads == 1, "the budget is given back on the hub's loop")
        connection.channel.embeddedEventLoop.run()
        #expect(connection.budget.value.inFlight == 0)
        #expect(connection.counter.reads == 2, "one read resumed, however many were asked for")
        connection.channel.read()
        #expect(connection.counter.reads == 3)
        _ = try connection.channel.finish()
    }

    @Test func aBatchUnderTheBudgetDoesNotPauseReading() throws {
        let hub = FakeHub()
        hub.hold()
        let connection = try IngestConnection(budgetBytes: 100, hub: hub)
        try connection.read(bytes("{\"topic\":\"a\"}\n"))
        connection.channel.read()
        #expect(connection.counter.reads == 1)
        #expect(hub.heldCount == 1)
        _ = try connection.channel.finish()
    }

    @Test func theBudgetIsSharedByEveryConnection() throws {
        let loop = EmbeddedEventLoop()
        let budget = NIOLoopBound(IngestBudget(limit: 20), eventLoop: loop)
        let hub = FakeHub()
        hub.hold()
        let first = try IngestConnection(hub: hub, loop: loop, budget: budget)
        let second = try IngestConnection(hub: hub, loop: loop, budget: budget)
        try first.read(bytes("{\"topic\":\"aaaaaaaaaaaaaaaaaaaa\"}\n"))
        second.channel.read()
        #expect(second.counter.reads == 0, "the other connection's batch spent the budget")
        hub.release()
        loop.run()
        #expect(second.counter.reads == 1)
        _ = try first.channel.finish()
        _ = try second.channel.finish()
    }

    @Test func aPauseFromTheHubHoldsReadingUntilItEnds() throws {
        let hub = FakeHub()
        let connection = try IngestConnection(budgetBytes: 1 << 20, hub: hub)
        let pause = connection.channel.embeddedEventLoop.makePromise(of: Void.self)
        hub.pauseNext(until: pause.futureResult)
        try connection.read(bytes("{\"topic\":\"a\"}\n"))
        connection.channel.embeddedEventLoop.run()
        #expect(connection.budget.value.inFlight == 0)
        connection.channel.read()
        #expect(connection.counter.reads == 0, "paused though no byte is in flight")
        pause.succeed()
        #expect(connection.counter.reads == 1)
        _ = try connection.channel.finish()
    }
}

@Suite struct IngestParkingTests {
    @Test func aConnectionOverItsUidShareIsNotReadUntilOneEnds() throws {
        let loop = EmbeddedEventLoop()
        let emitters = EmitterLimits(settings: EmitterLimitSettings(maxEmittersPerUID: 1))
        let first = try IngestConnection(uid: 7, emitters: emitters, loop: loop)
        let second = try IngestConnection(uid: 7, emitters: emitters, loop: loop)
        let otherUID = try IngestConnection(uid: 8, emitters: emitters, loop: loop)
        first.channel.read()
        second.channel.read()
        otherUID.channel.read()
        #expect(first.counter.reads == 1)
        #expect(second.counter.reads == 0, "parked")
        #expect(otherUID.counter.reads == 1, "another uid has its own share")
        _ = try first.channel.finish()
        loop.run()
        #expect(second.counter.reads == 1, "the read asked for while parked is passed on")
        _ = try second.channel.finish()
        _ = try otherUID.channel.finish()
    }
}

@Suite struct IngestSeamTests {
    /// The entry point the fuzz harness uses (no `@testable`): the same handler, the same outcome.
    @Test func theSeamsHandlerGivesTheReference() throws {
        let loop = EmbeddedEventLoop()
        let hub = FakeHub()
        let handler = IngestSeam.handler(
            maxEventBytes: Streams.longLimit, budgetBytes: 1 << 20, grants: GrantSet(["t", "u"]), eventLoop: loop,
            publish: hub.publish)
        let channel = EmbeddedChannel(handler: handler, loop: loop)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        let stream = Streams.long + bytes("{\"topic\":\"v\"}\n")
        for start in stride(from: 0, to: stream.count, by: 7) {
            try channel.writeInbound(channel.allocator.buffer(bytes: stream[start..<min(start + 7, stream.count)]))
        }
        var answers = ""
        while let buffer = try channel.readOutbound(as: ByteBuffer.self) {
            answers += String(decoding: buffer.readableBytesView, as: UTF8.self)
        }
        let expected = IngestReference.outcome(of: stream, maxEventBytes: Streams.longLimit, grants: GrantSet(["t", "u"]))
        #expect(expected.answers.hasSuffix(IngestReference.answer(.forbiddenTopic, 9)))
        #expect(IngestReference.Outcome(published: hub.published, answers: answers) == expected)
        _ = try channel.finish()
    }
}
