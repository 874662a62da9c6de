// HTTPEdgeGuard: the first handler of every HTTP/WebSocket connection. It counts the connection
// (`--max-connections`), admits its first request head (`--max-connections-per-ip`), times the
// handshake and keep-alive gaps (`--handshake-timeout`, 5 s), and writes the answers the edge
// gives before any upgrade (503, 408, 414, 431, 400) as raw bytes, since it sits in front of
// the HTTP codec and needs no state of it: each such answer ends the connection.
//
// It sees the raw bytes so that it knows whether a request has started (408 or a silent close)
// and whether its request line has ended (414 or 431: NIO raises one error for every limit).
// After an upgrade it only passes bytes on; it stays to see the connection close.

import NIOCore
import NIOHTTP1

/// An answer the edge gives instead of serving a request, and then closes.
enum EdgeRefusal {
    case tooManyConnections
    case tooManyFromAddress
    case requestTimeout
    case uriTooLong
    case headersTooLarge
    case badRequest

    var statusLine: String {
        switch self {
        case .tooManyConnections, .tooManyFromAddress: return "503 Service Unavailable"
        case .requestTimeout: return "408 Request Timeout"
        case .uriTooLong: return "414 URI Too Long"
        case .headersTooLarge: return "431 Request Header Fields Too Large"
        case .badRequest: return "400 Bad Request"
        }
    }

    var body: String {
        switch self {
        case .tooManyConnections: return "too many connections, retry later\n"
        case .tooManyFromAddress: return "too many connections from this address, retry later\n"
        case .requestTimeout: return "request not completed in time\n"
        case .uriTooLong: return "request line over 8 KiB\n"
        case .headersTooLarge: return "request headers over the limit (8 KiB each, 32 KiB in all, 100 fields)\n"
        case .badRequest: return "malformed HTTP request\n"
        }
    }

    var metricReason: String {
        switch self {
        case .tooManyConnections: return "max_connections"
        case .tooManyFromAddress: return "max_connections_per_ip"
        case .requestTimeout: return "timeout"
        case .uriTooLong: return "uri_too_long"
        case .headersTooLarge: return "headers_too_large"
        case .badRequest: return "bad_request"
        }
    }

    /// A full response; `Retry-After: 1` on 503: a slot frees as soon as any connection closes,
    /// and a second is long enough not to turn a refusal into a reconnect storm.
    func response(withBody: Bool) -> String {
        var lines = ["HTTP/1.1 \(statusLine)"]
        if case .tooManyConnections = self { lines.append("Retry-After: 1") }
        if case .tooManyFromAddress = self { lines.append("Retry-After: 1") }
        lines += [
            "Connection: close", "Content-Type: text/plain; charset=utf-8", "Cache-Control: no-store",
            "Content-Length: \(body.utf8.count)",
        ]
        return lines.joined(separator: "\r\n") + "\r\n\r\n" + (withBody ? body : "")
    }
}

final class HTTPEdgeGuard: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private enum Phase {
        /// No byte of the next request yet (just accepted, or between keep-alive requests).
        case waiting
        /// A request is arriving: from its first byte to its `.end`.
        case receiving
        /// The request is read; the relay is answering it.
        case answering
        case upgraded
        case closing
    }

    private enum Admission {
        case admitted(ClientKey?)
        case refused(EdgeRefusal)
    }

    private let limits: ConnectionLimits
    private var context: ChannelHandlerContext?
    private var phase = Phase.waiting
    private var counted = false
    private var overLimit = false
    private var admission: Admission?
    /// Bytes of the current request arrived, and no line end yet: its request line is open.
    private var requestLineOpen = false
    /// The current request line's length so far: NIO reports an overlong target and overlong
    /// headers as one error, and a line this long tells which it was.
    private var requestLineBytes = 0
    /// Bytes of a pipelined request arrived while the previous one was being answered.
    private var nextRequestStarted = false
    private var timer: Scheduled<Void>?

    init(limits: ConnectionLimits) {
        self.limits = limits
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        if context.channel.isActive { opened(context: context) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        timer?.cancel()
        self.context = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        opened(context: context)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        timer?.cancel()
        timer = nil
        if counted {
            counted = false
            limits.closed()
        }
        if case .admitted(let key?) = admission {
            limits.release(key)
            admission = .admitted(nil)
        }
        context.fireChannelInactive()
    }

    private func opened(context: ChannelHandlerContext) {
        guard !counted else { return }
        counted = true
        overLimit = limits.opened()
        // The first request has the handshake timeout from the accept on, bytes or none.
        arm(limits.settings.handshakeTimeout)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch phase {
        case .upgraded:
            break
        case .closing:
            return
        case .waiting:
            if admission != nil {
                // A later request: its own handshake timeout from its first byte.
                arm(limits.settings.handshakeTimeout)
            }
            phase = .receiving
            requestLineOpen = true
            requestLineBytes = 0
            noteLineEnd(in: unwrapInboundIn(data))
        case .receiving:
            if requestLineOpen { noteLineEnd(in: unwrapInboundIn(data)) }
        case .answering:
            nextRequestStarted = true
        }
        context.fireChannelRead(data)
    }

    private func noteLineEnd(in buffer: ByteBuffer) {
        // A request may be preceded by empty lines (RFC 9112 section 2.2): skip them.
        var view = buffer.readableBytesView[...]
        if requestLineBytes == 0 {
            while let first = view.first, first == UInt8(ascii: "\r") || first == UInt8(ascii: "\n") {
                view = view.dropFirst()
            }
        }
        if let end = view.firstIndex(of: UInt8(ascii: "\n")) {
            requestLineBytes += end - view.startIndex
            requestLineOpen = false
        } else {
            requestLineBytes += view.count
        }
    }

    /// Whether NIO's `headerOverflow` was about the request target: the line is still open, or
    /// longer than the target's limit plus the longest method and version ("OPTIONS ", " HTTP/1.1\r").
    private var requestTargetOverflowed: Bool {
        requestLineOpen || requestLineBytes > HTTPEdgeSettings.decoderLimits.maxHeaderFieldSize + 18
    }

    // MARK: Called by the HTTP handler and the upgrader, on this channel's loop

    /// The request head arrived: nil when it may be served, else the answer to give. The first
    /// head decides for the whole connection; per-address accounting starts here, since the
    /// forwarding headers are known only now.
    func admit(_ head: HTTPRequestHead) -> EdgeRefusal? {
        requestLineOpen = false
        requestLineBytes = 0
        if admission == nil {
            if overLimit {
                admission = .refused(.tooManyConnections)
            } else if let key = ClientKey.of(
                peer: context?.channel.remoteAddress, headers: head.headers, trusted: limits.settings.trustedProxies)
            {
                admission = limits.acquire(key) ? .admitted(key) : .refused(.tooManyFromAddress)
            } else {
                admission = .admitted(nil)
            }
        }
        if case .refused(let refusal) = admission { return refusal }
        return nil
    }

    /// The request's `.end` arrived: the client has done its part in time.
    func requestEnded() {
        guard phase == .receiving else { return }
        phase = .answering
        timer?.cancel()
        timer = nil
    }

    /// The answer went out on a connection that stays open.
    func responseEnded() {
        if phase == .closing { return context?.close(promise: nil) ?? () }
        guard phase == .answering else { return }
        if nextRequestStarted {
            nextRequestStarted = false
            phase = .receiving
            requestLineOpen = false
            requestLineBytes = 0
            arm(limits.settings.handshakeTimeout)
        } else {
            phase = .waiting
            arm(limits.settings.keepAliveIdle)
        }
    }

    /// The 101 went out: a WebSocket now, timed by its pings.
    func upgraded() {
        phase = .upgraded
        timer?.cancel()
        timer = nil
    }

    /// NIO's request decoder failed: 414 or 431 for a limit, 400 for anything else.
    func decoderFailed(_ error: HTTPParserError) {
        guard phase != .closing else { return }
        guard phase != .answering else {
            // An answer is on its way; a second one cannot follow it. Close once it is out.
            phase = .closing
            return
        }
        if case .headerOverflow = error {
            refuse(requestTargetOverflowed ? .uriTooLong : .headersTooLarge)
        } else {
            refuse(.badRequest)
        }
    }

    /// Answers with `refusal` and closes; whatever the client sends meanwhile is dropped.
    func refuse(_ refusal: EdgeRefusal, withBody: Bool = true) {
        guard let context, phase != .closing, phase != .upgraded else { return }
        phase = .closing
        timer?.cancel()
        timer = nil
        limits.refused(refusal)
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: refusal.response(withBody: withBody))))
            .whenComplete { _ in channel.close(promise: nil) }
    }

    private func arm(_ delay: TimeAmount) {
        timer?.cancel()
        guard let context else { return }
        let loop = context.eventLoop
        timer = loop.assumeIsolated().scheduleTask(in: delay) { [self] in
            self.timer = nil
            self.expired()
        }
    }

    private func expired() {
        switch phase {
        case .receiving:
            refuse(.requestTimeout)
        case .waiting:
            // Nothing was asked: nothing to answer. An idle keep-alive gap is no refusal.
            phase = .closing
            if admission == nil { limits.refused(.requestTimeout) }
            context?.close(promise: nil)
        case .answering, .upgraded, .closing:
            break
        }
    }
}
