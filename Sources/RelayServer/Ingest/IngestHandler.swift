// IngestHandler: one emitter connection on the Unix socket.
//
// Splits the byte stream into lines, validates each one on its own (a bad
// line is answered with `{"error":..,"line":n}` and costs nothing else),
// and hands the good lines of one read to the hub as one batch. Reading
// pauses while the events of all emitter connections still on their way to
// subscribers spend the shared `IngestBudget`: then the kernel holds the
// writer back, and no accepted line is ever dropped. Answers are written
// only while the socket takes them, so an emitter that never reads its
// answers loses just those (counted), and they never pile up in memory.
//
// The bounds that make an emitter connection end are drains, never closes:
// a connection silent for `--emitter-idle-timeout`, or holding an unfinished
// line older than `--emitter-partial-line-timeout`, has its reading side shut
// (so a racing write fails and the emitter resends elsewhere), its complete
// lines published and its partial one dropped, as at shutdown. A connection
// of a uid over `--max-emitters-per-uid` is parked (not read) meanwhile.

#if canImport(Glibc)
import Glibc
#endif
import Logging
import NIOCore
import RelayHub

/// What every ingest connection shares.
struct IngestEnvironment: Sendable {
    /// Where a read's good lines go: `HubDriver.publish` in the relay, a fake hub in tests.
    let publish: IngestPublish
    let metrics: RelayMetrics
    let maxEventBytes: Int
    let logger: Logger
    /// Shared by every emitter connection; lives on the hub's loop like they do.
    let budget: NIOLoopBound<IngestBudget>
    /// `--max-emitters`, the per-uid shares and the emitter timeouts.
    let emitters: EmitterLimits
}

/// After the emitter's end-of-file, how long its answers may take to be written before the
/// connection is closed anyway: answers may be lost, a descriptor held forever may not.
private let answerGrace = TimeAmount.seconds(5)

final class IngestHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let environment: IngestEnvironment
    private let peer: PeerCredentials

    /// The unfinished line of the previous read.
    private var partial: ByteBuffer?
    /// Bytes held from one read to the next (the unfinished line), for the tests of its bound.
    var bufferedBytes: Int { partial?.readableBytes ?? 0 }
    /// Inside a line already rejected as too long: skip up to its newline.
    private var skippingLongLine = false
    private var lineNumber = 0
    private var batch: [IncomingEvent] = []
    private var batchBytes = 0
    private var batchReadAt: NIODeadline?
    private var answersWritten = false
    private var readHeld = false
    private var active = true
    private var rejectionLog = RejectionLogLimiter()
    /// This connection's place in its uid's share; nil before it is active and after it ends.
    private var admission: EmitterLimits.Admission?
    /// Over its uid's share: not read until `unpark`.
    private var parked = false
    /// A read NIO asked for while parked, to be passed on at `unpark`.
    private var readPending = false
    /// When bytes last arrived, or reading last resumed: the idle timeout counts from here.
    private var lastActivity = NIODeadline.now()
    /// When the unfinished line in `partial` (or the long line being skipped) began.
    private var partialSince: NIODeadline?
    private var limitCheck: Scheduled<Void>?
    /// Reading side shut (idle, partial line) or end-of-file seen: no second drain.
    private var draining = false

    init(environment: IngestEnvironment, peer: PeerCredentials) {
        self.environment = environment
        self.peer = peer
    }

    func channelActive(context: ChannelHandlerContext) {
        environment.metrics.emitterConnected(1)
        environment.logger.debug("emitter connected", metadata: ["peer": "\(peer)"])
        let loop = context.eventLoop
        let handler = NIOLoopBound(self, eventLoop: loop)
        let channel = context.channel
        let admission = environment.emitters.enter(uid: peer.uid) {
            loop.execute { handler.value.unpark(channel) }
        }
        self.admission = admission
        if !admission.reading {
            parked = true
            environment.logger.info(
                "emitter connection parked: its uid has --max-emitters-per-uid connections being read",
                metadata: ["pid": "\(peer.pid)", "uid": "\(peer.uid)"])
        }
        lastActivity = .now()
        scheduleLimitCheck(context: context)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        active = false
        limitCheck?.cancel()
        limitCheck = nil
        if let admission { environment.emitters.leave(admission, wasReading: !parked) }
        admission = nil
        if let unlogged = rejectionLog.finish() { logUnlogged(unlogged) }
        environment.metrics.emitterConnected(-1)
        context.fireChannelInactive()
    }

    /// The uid is under its share again (or the relay shuts down): read from now on.
    private func unpark(_ channel: any Channel) {
        guard parked else { return }
        parked = false
        lastActivity = .now()
        if partialSince != nil { partialSince = lastActivity }
        environment.logger.debug("emitter connection unparked", metadata: ["pid": "\(peer.pid)", "uid": "\(peer.uid)"])
        if readPending, active {
            readPending = false
            channel.read()
        }
    }

    // MARK: Idle and unfinished lines

    /// One timer per connection, re-armed when it fires (not on every read): it fires at the idle
    /// deadline or a quarter of the partial-line timeout, whichever is sooner, so an unfinished
    /// line is caught within 1.25 times its bound.
    private func scheduleLimitCheck(context: ChannelHandlerContext) {
        let settings = environment.emitters.settings
        let step = TimeAmount.nanoseconds(max(settings.partialLineTimeout.nanoseconds / 4, 10_000_000))
        let next = min(lastActivity + settings.idleTimeout, .now() + step)
        limitCheck = context.eventLoop.assumeIsolated().scheduleTask(deadline: next) { [self] in
            checkLimits(context: context)
        }
    }

    private func checkLimits(context: ChannelHandlerContext) {
        limitCheck = nil
        guard active, !draining else { return }
        let now = NIODeadline.now()
        if let unlogged = rejectionLog.rollOver(now: now) { logUnlogged(unlogged) }
        let settings = environment.emitters.settings
        if parked || readHeld {
            // Not being read: neither the silence nor the unfinished line is the emitter's doing.
            lastActivity = now
            if partialSince != nil { partialSince = now }
        } else if let since = partialSince, now - since >= settings.partialLineTimeout {
            return drain(context: context, reason: "partial_line")
        } else if now - lastActivity >= settings.idleTimeout {
            return drain(context: context, reason: "idle")
        }
        scheduleLimitCheck(context: context)
    }

    /// The contract's drain: shut the reading side (a racing write fails, so the emitter resends
    /// on a new connection), read what was written before, publish its complete lines, drop a
    /// partial last one and close (the end-of-file path in `userInboundEventTriggered`).
    private func drain(context: ChannelHandlerContext, reason: String) {
        draining = true
        environment.logger.info(
            "emitter connection drained and closed",
            metadata: ["reason": "\(reason)", "pid": "\(peer.pid)", "uid": "\(peer.uid)"])
        guard context.channel.isActive, peer.descriptor >= 0 else { return }
        // On the channel's loop, an active channel still owns its descriptor.
        try? SystemCalls.shutdown(peer.descriptor, SHUT_RD)
    }

    // MARK: Lines

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        let now = NIODeadline.now()
        lastActivity = now
        if batchReadAt == nil { batchReadAt = now }
        // A newline in this read finishes the line `partialSince` dates.
        var finishedALine = false
        if var earlier = partial {
            partial = nil
            earlier.writeBuffer(&buffer)
            buffer = earlier
        }
        while buffer.readableBytes > 0 {
            let newline = buffer.withUnsafeReadableBytes { raw -> Int? in
                guard let base = raw.baseAddress, let hit = memchr(base, 0x0A, raw.count) else { return nil }
                return base.distance(to: UnsafeRawPointer(hit))
            }
            guard let newline else {
                if skippingLongLine {
                    buffer.moveReaderIndex(to: buffer.writerIndex)
                } else if buffer.readableBytes > environment.maxEventBytes + 1 {
                    // Over the limit before its end: reject now, skip the rest as it comes.
                    lineNumber += 1
                    reject(.tooLong, context: context)
                    skippingLongLine = true
                    buffer.moveReaderIndex(to: buffer.writerIndex)
                } else if buffer.readableBytes * 4 < buffer.capacity {
                    // Its own small buffer, so a slow line does not keep a whole read buffer alive.
                    var own = context.channel.allocator.buffer(capacity: buffer.readableBytes)
                    own.writeBuffer(&buffer)
                    partial = own
                } else {
                    partial = buffer
                }
                if finishedALine || partialSince == nil { partialSince = now }
                return
            }
            var line = buffer.readSlice(length: newline)!
            buffer.moveReaderIndex(forwardBy: 1)
            finishedALine = true
            if skippingLongLine {
                skippingLongLine = false
                continue
            }
            lineNumber += 1
            if line.readableBytes > 0, line.getInteger(at: line.writerIndex - 1, as: UInt8.self) == UInt8(ascii: "\r") {
                line.moveWriterIndex(to: line.writerIndex - 1)
            }
            accept(line, context: context)
        }
        partialSince = nil
    }

    private func accept(_ line: ByteBuffer, context: ChannelHandlerContext) {
        guard line.readableBytes <= environment.maxEventBytes else {
            return reject(.tooLong, context: context)
        }
        let result = line.withUnsafeReadableBytes { IngestLineParser.parse($0) }
        switch result {
        case .success(let parsed):
            // `--publish-grant`: the connection's grants were computed when it was accepted.
            if let grants = peer.grants, !grants.covers(parsed.topic) {
                return reject(.forbiddenTopic, context: context, topic: parsed.topic)
            }
            let object = line.getSlice(at: line.readerIndex + parsed.objectStart, length: parsed.objectEnd - parsed.objectStart)!
            batch.append(IncomingEvent(topic: parsed.topic, object: object))
            batchBytes += object.readableBytes
        case .failure(let error):
            // A blank line (`echo` habits, keep-alives) is no event and no mistake.
            if line.readableBytesView.allSatisfy({ $0 == 0x20 || $0 == 0x09 }) { return }
            reject(error, context: context)
        }
    }

    private func reject(_ reason: IngestLineError, context: ChannelHandlerContext, topic: String? = nil) {
        environment.metrics.eventRejected(reason)
        let (log, unlogged) = rejectionLog.admit()
        if let unlogged { logUnlogged(unlogged) }
        if log {
            var metadata: Logger.Metadata = [
                "reason": "\(reason.rawValue)", "line": "\(lineNumber)", "pid": "\(peer.pid)", "uid": "\(peer.uid)",
            ]
            if let topic { metadata["topic"] = "\(topic)" }
            environment.logger.info("rejected ingest line", metadata: metadata)
        }
        guard context.channel.isWritable else {
            environment.metrics.answerDropped()
            return
        }
        let answer = "{\"error\":\"\(reason.rawValue)\",\"line\":\(lineNumber)}\n"
        context.write(wrapOutboundOut(context.channel.allocator.buffer(string: answer)), promise: nil)
        answersWritten = true
    }

    /// The summary of a minute's rejected lines beyond the first few.
    private func logUnlogged(_ count: Int) {
        environment.logger.notice(
            "ingest lines rejected on this connection and not logged",
            metadata: [
                "count": "\(count)", "pid": "\(peer.pid)", "uid": "\(peer.uid)",
                "logged": "the first \(rejectionLog.perWindow) a minute",
            ])
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if answersWritten {
            answersWritten = false
            context.flush()
        }
        publishBatch(context: context)
        context.fireChannelReadComplete()
    }

    private func publishBatch(context: ChannelHandlerContext) {
        guard !batch.isEmpty else {
            batchReadAt = nil
            return
        }
        let events = batch
        let bytes = batchBytes
        batch = []
        batchBytes = 0
        let readAt = batchReadAt ?? .now()
        batchReadAt = nil
        environment.metrics.eventsReceived(events.count)
        environment.budget.value.take(bytes)
        let loop = context.eventLoop
        let budget = environment.budget
        let pause = environment.publish(events, readAt) {
            loop.execute { budget.value.give(bytes) }
        }
        if let pause { budget.value.block(until: pause) }
    }

    // MARK: Backpressure and end

    func read(context: ChannelHandlerContext) {
        if parked {
            readPending = true
            return
        }
        let budget = environment.budget.value
        guard budget.isSpent else { return context.read() }
        guard !readHeld else { return }
        readHeld = true
        environment.metrics.ingestPausedForBudget()
        budget.wait { [self] in
            readHeld = false
            lastActivity = .now()
            if partialSince != nil { partialSince = lastActivity }
            if active { context.read() }
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard case ChannelEvent.inputClosed = event else { return context.fireUserInboundEventTriggered(event) }
        // The writer is done (or shutdown cut the reading side): an unfinished last line is dropped.
        if partial != nil || skippingLongLine {
            environment.logger.debug("dropped a partial last line", metadata: ["pid": "\(peer.pid)"])
        }
        partial = nil
        partialSince = nil
        draining = true
        limitCheck?.cancel()
        limitCheck = nil
        publishBatch(context: context)
        let channel = context.channel
        let giveUp = context.eventLoop.scheduleTask(in: answerGrace) { channel.close(promise: nil) }
        context.writeAndFlush(wrapOutboundOut(channel.allocator.buffer(capacity: 0))).whenComplete { _ in
            giveUp.cancel()
            channel.close(promise: nil)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        environment.logger.debug("emitter connection error", metadata: ["error": "\(error)", "pid": "\(peer.pid)"])
        context.close(promise: nil)
    }
}
