// IngestHandler: one emitter connection on the Unix socket.
//
// Splits the byte stream into lines, validates each one on its own (a bad
// line is answered with `{"error":..,"line":n}` and costs nothing else),
// and hands the good lines of one read to the hub as one batch. Reading
// pauses while the events of all emitter connections still on their way to
// subscribers spend the shared `IngestBudget`: then the kernel holds the
// writer back, and no accepted line is ever dropped. Answers are written
// only while the socket takes them, so an emitter that never reads its
// answers loses just those.

#if canImport(Glibc)
import Glibc
#endif
import Logging
import NIOCore
import RelayHub

/// What every ingest connection shares.
struct IngestEnvironment: Sendable {
    let driver: HubDriver
    let metrics: RelayMetrics
    let maxEventBytes: Int
    let logger: Logger
    /// Shared by every emitter connection; lives on the hub's loop like they do.
    let budget: NIOLoopBound<IngestBudget>
}

final class IngestHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let environment: IngestEnvironment
    private let peer: PeerCredentials

    /// The unfinished line of the previous read.
    private var partial: ByteBuffer?
    /// Inside a line already rejected as too long: skip up to its newline.
    private var skippingLongLine = false
    private var lineNumber = 0
    private var batch: [IncomingEvent] = []
    private var batchBytes = 0
    private var batchReadAt: NIODeadline?
    private var answersWritten = false
    private var readHeld = false
    private var active = true
    private var rejectionsLogged = 0

    init(environment: IngestEnvironment, peer: PeerCredentials) {
        self.environment = environment
        self.peer = peer
    }

    func channelActive(context: ChannelHandlerContext) {
        environment.metrics.emitterConnected(1)
        environment.logger.debug("emitter connected", metadata: ["peer": "\(peer)"])
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        active = false
        environment.metrics.emitterConnected(-1)
        context.fireChannelInactive()
    }

    // MARK: Lines

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        if batchReadAt == nil { batchReadAt = .now() }
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
                } else {
                    partial = buffer
                }
                return
            }
            var line = buffer.readSlice(length: newline)!
            buffer.moveReaderIndex(forwardBy: 1)
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
        if rejectionsLogged < 100 {
            rejectionsLogged += 1
            var metadata: Logger.Metadata = [
                "reason": "\(reason.rawValue)", "line": "\(lineNumber)", "pid": "\(peer.pid)", "uid": "\(peer.uid)",
            ]
            if let topic { metadata["topic"] = "\(topic)" }
            environment.logger.info("rejected ingest line", metadata: metadata)
            if rejectionsLogged == 100 {
                environment.logger.notice("further rejected lines on this connection are not logged", metadata: ["pid": "\(peer.pid)"])
            }
        }
        guard context.channel.isWritable else {
            environment.metrics.answerDropped()
            return
        }
        let answer = "{\"error\":\"\(reason.rawValue)\",\"line\":\(lineNumber)}\n"
        context.write(wrapOutboundOut(context.channel.allocator.buffer(string: answer)), promise: nil)
        answersWritten = true
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
        let pause = environment.driver.publish(events, readAt: readAt) {
            loop.execute { budget.value.give(bytes) }
        }
        if let pause { budget.value.block(until: pause) }
    }

    // MARK: Backpressure and end

    func read(context: ChannelHandlerContext) {
        let budget = environment.budget.value
        guard budget.isSpent else { return context.read() }
        guard !readHeld else { return }
        readHeld = true
        environment.metrics.ingestPausedForBudget()
        budget.wait { [self] in
            readHeld = false
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
        publishBatch(context: context)
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(channel.allocator.buffer(capacity: 0))).whenComplete { _ in
            channel.close(promise: nil)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        environment.logger.debug("emitter connection error", metadata: ["error": "\(error)", "pid": "\(peer.pid)"])
        context.close(promise: nil)
    }
}
