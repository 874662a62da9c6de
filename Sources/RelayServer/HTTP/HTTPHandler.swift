// HTTPHandler: the plain HTTP routes (`/healthz`, `/readyz`, `/metrics`, `/stats`,
// `POST /ticket`) and the answers to a `/ws` request that was not upgraded.

import Foundation
import Logging
import NIOCore
import NIOHTTP1
import RelayAuth
import RelayHub

/// A request target split into path and query items.
struct RequestTarget {
    var path: String
    /// The query's items, percent-decoded (`+` is a space); nil when one holds a malformed escape
    /// (PercentDecoding.swift). The routes that read a query (`/ws`, `/sse`, `/topics/`) answer
    /// that with 400 before reading any item, so `values` never silently misses one.
    var query: [(name: String, value: String)]?

    init(_ uri: String) {
        let parts = uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
        path = String(parts.first ?? "")
        query = []
        guard parts.count == 2 else { return }
        var items: [(name: String, value: String)] = []
        for item in parts[1].split(separator: "&") {
            let pair = item.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard let name = PercentDecoding.decode(pair[0], plusAsSpace: true),
                let value = pair.count > 1 ? PercentDecoding.decode(pair[1], plusAsSpace: true) : ""
            else {
                query = nil
                return
            }
            items.append((name, value))
        }
        query = items
    }

    /// The values of every `name=` item, in order; none when the query is malformed.
    func values(_ name: String) -> [String] { (query ?? []).filter { $0.name == name }.map(\.value) }

    /// What a route that reads the query answers when `query` is nil.
    static let malformedQueryMessage = "malformed percent-escape in the query"
}

/// The live page and the browser client, embedded in the binary (no CDN, no files to install).
enum StaticFiles {
    static let livePage = ByteBuffer(bytes: PackageResources.live_html)
    static let browserClient = ByteBuffer(bytes: PackageResources.progress_relay_js)
}

/// What the HTTP routes read from the rest of the relay.
struct HTTPRoutes: Sendable {
    let origins: OriginPolicy
    let metricsText: @Sendable () -> String
    let statsJSON: @Sendable () -> EventLoopFuture<String>
    /// Whether the relay can publish (`/readyz`), and if not why.
    let readiness: @Sendable () -> EventLoopFuture<(ready: Bool, reason: String)>
    /// One-time WebSocket tickets (`POST /ticket`, `GET /ws?ticket=`), shared by every loop.
    let tickets: TicketStore
    let verifier: TokenVerifier
    let logger: Logger
    /// `GET /topics/{topic}` and its long-poll `/events` (TopicRoutes.swift); nil serves no `/topics`.
    var longPoll: LongPoll? = nil
    /// `GET /sse` (SSE/SSERoute.swift); nil serves no `/sse`.
    var eventStreams: SSEEnvironment? = nil

    /// Browsers send `Origin`; other clients do not and are always allowed.
    func originAllowed(_ head: HTTPRequestHead) -> Bool {
        origins.allows(origin: head.headers.first(name: "origin"), host: head.headers.first(name: "host"))
    }

    /// Takes every `?ticket=` of a `/ws` request out of the store (a ticket is used once, even
    /// by a handshake that fails) and says what the first stood for; nil without a ticket.
    func redeemTicket(_ head: HTTPRequestHead) -> Result<Principal, TokenError>? {
        let target = RequestTarget(head.uri)
        guard target.path == "/ws" else { return nil }
        let origin = head.headers.first(name: "origin")
        let results = target.values("ticket").map { tickets.redeem($0, origin: origin) }
        return results.first
    }

    /// `Authorization: Bearer <token>`, nil without one.
    static func bearerToken(_ headers: HTTPHeaders) -> String? {
        guard let value = headers.first(name: "authorization") else { return nil }
        let parts = value.split(separator: " ", maxSplits: 1)
        guard parts.count == 2, parts[0].lowercased() == "bearer" else { return nil }
        return parts[1].trimmingCharacters(in: .whitespaces)
    }
}

final class HTTPHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let routes: HTTPRoutes
    /// The connection's limits and timers; it answers what the edge refuses.
    private let edge: HTTPEdgeGuard
    private var head: HTTPRequestHead?
    /// The connection was refused at its request head: the rest of it is not read.
    private var refused = false

    init(routes: HTTPRoutes, edge: HTTPEdgeGuard) {
        self.routes = routes
        self.edge = edge
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !refused else { return }
        switch unwrapInboundIn(data) {
        case .head(let head):
            if let refusal = edge.admit(head) {
                // Before routing: a refused `/ws?ticket=` keeps its ticket for the retry.
                refused = true
                return edge.refuse(refusal, withBody: head.method != .HEAD)
            }
            self.head = head
        case .body:
            break
        case .end:
            edge.requestEnded()
            guard let head else { return }
            self.head = nil
            route(head, context: context)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        // A refused WebSocket handshake is reported here and then answered as plain HTTP; a
        // request NIO's decoder could not read (a limit, or malformed) is answered by the edge.
        if let error = error as? HTTPParserError { edge.decoderFailed(error) }
    }

    private func route(_ head: HTTPRequestHead, context: ChannelHandlerContext) {
        let target = RequestTarget(head.uri)
        if target.path == "/ticket" { return ticket(head, context: context) }
        if target.path == "/sse", let eventStreams = routes.eventStreams {
            return SSERoute.serve(head, routes: routes, environment: eventStreams, edge: edge, context: context)
        }
        if target.path.hasPrefix("/topics/"), let longPoll = routes.longPoll {
            return TopicRoutes.serve(head, routes: routes, longPoll: longPoll, edge: edge, context: context)
        }
        if target.path == "/ws" {
            // Refused before its ticket is read: the ticket stays usable, as after an edge refusal.
            guard target.query != nil else {
                return respond(
                    head, .badRequest, Self.errorJSON("bad_request", RequestTarget.malformedQueryMessage),
                    contentType: "application/json", context: context)
            }
            // Whatever the answer, a ticket in this URL is now used.
            _ = routes.redeemTicket(head)
        }
        guard head.method == .GET || head.method == .HEAD else {
            return respond(head, .methodNotAllowed, "method not allowed\n", context: context)
        }
        switch target.path {
        case "/healthz":
            respond(head, .ok, "ok", context: context)
        case "/readyz":
            routes.readiness().hop(to: context.eventLoop).assumeIsolated().whenSuccess { state in
                self.respond(head, state.ready ? .ok : .serviceUnavailable, state.reason + "\n", context: context)
            }
        case "/metrics":
            respond(head, .ok, routes.metricsText(), contentType: "text/plain; version=0.0.4", context: context)
        case "/stats":
            routes.statsJSON().hop(to: context.eventLoop).assumeIsolated().whenSuccess { json in
                self.respond(head, .ok, json, contentType: "application/json", context: context)
            }
        case "/ws":
            if !routes.originAllowed(head) {
                respond(head, .forbidden, "origin not allowed\n", context: context)
            } else if let refusal = OfferedSubprotocols(head.headers).refusal {
                respond(head, .badRequest, refusal + "\n", context: context)
            } else if WebSocketHandshake.asksForUpgrade(head), !WebSocketHandshake.hasSupportedVersion(head) {
                // RFC 6455 section 4.4: name the version the relay speaks, so the client can retry.
                respond(
                    head, .upgradeRequired, "Sec-WebSocket-Version 13 is the only one supported\n",
                    extraHeaders: [("Sec-WebSocket-Version", "13")], context: context)
            } else if WebSocketHandshake.asksForUpgrade(head), !WebSocketHandshake.hasValidKey(head) {
                respond(head, .badRequest, "Sec-WebSocket-Key must be one base64 value of 16 bytes\n", context: context)
            } else {
                respond(head, .upgradeRequired, "a WebSocket handshake is required here\n", context: context)
            }
        case "/":
            // The page's URL may carry a token: it must not leak through Referer or framing.
            respond(
                head, .ok, StaticFiles.livePage, contentType: "text/html; charset=utf-8",
                extraHeaders: [
                    ("Referrer-Policy", "no-referrer"), ("X-Content-Type-Options", "nosniff"),
                    ("Content-Security-Policy", "frame-ancestors 'none'"),
                ], context: context)
        case "/progress-relay.js":
            // A public static file (no credentials, no token): pages of any origin may import it.
            respond(
                head, .ok, StaticFiles.browserClient, contentType: "text/javascript; charset=utf-8",
                extraHeaders: [("Access-Control-Allow-Origin", "*")], context: context)
        default:
            respond(head, .notFound, "not found\n", context: context)
        }
    }

    // MARK: Tickets

    /// `POST /ticket` with `Authorization: Bearer <token>`: a one-time ticket for `GET /ws?ticket=`,
    /// so that no URL carries the token. `OPTIONS` answers a browser's CORS preflight.
    private func ticket(_ head: HTTPRequestHead, context: ChannelHandlerContext) {
        let origin = head.headers.first(name: "origin")
        var cors: [(String, String)] = []
        if let origin {
            guard routes.originAllowed(head) else {
                return respond(
                    head, .forbidden, Self.errorJSON("forbidden", "origin not allowed"),
                    contentType: "application/json", context: context)
            }
            cors = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        }
        switch head.method {
        case .OPTIONS:
            respond(
                head, .noContent, "", extraHeaders: cors + [
                    ("Access-Control-Allow-Methods", "POST"), ("Access-Control-Allow-Headers", "Authorization"),
                    ("Access-Control-Max-Age", "600"),
                ], context: context)
        case .POST:
            let token = HTTPRoutes.bearerToken(head.headers)
            let routes = self.routes
            context.eventLoop.makeFutureWithTask { await routes.verifier.verify(token) }
                .assumeIsolated()
                .whenSuccess { result in
                    switch result {
                    case .success(let principal):
                        let ticket = routes.tickets.issue(for: principal, origin: origin)
                        routes.logger.debug(
                            "ticket issued", metadata: ["sub": "\(principal.subject)", "origin": "\(origin ?? "none")"])
                        self.respond(
                            head, .ok, "{\"ticket\":\"\(ticket)\",\"expires_in\":\(routes.tickets.lifetimeSeconds)}",
                            contentType: "application/json", extraHeaders: cors, context: context)
                    case .failure(let error):
                        routes.logger.info("ticket refused", metadata: ["reason": "\(error)"])
                        self.respond(
                            head, .unauthorized, Self.errorJSON("unauthorized", error.description),
                            contentType: "application/json",
                            extraHeaders: cors + [("WWW-Authenticate", "Bearer")], context: context)
                    }
                }
        default:
            respond(
                head, .methodNotAllowed, Self.errorJSON("method_not_allowed", "POST a bearer token here"),
                contentType: "application/json", extraHeaders: cors + [("Allow", "POST, OPTIONS")], context: context)
        }
    }

    static func errorJSON(_ code: String, _ message: String) -> String {
        let object = ["error": code, "message": message]
        guard let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) else {
            return "{\"error\":\"\(code)\"}"
        }
        return String(decoding: data, as: UTF8.self)
    }

    private func respond(
        _ request: HTTPRequestHead, _ status: HTTPResponseStatus, _ body: String,
        contentType: String = "text/plain; charset=utf-8", extraHeaders: [(String, String)] = [],
        context: ChannelHandlerContext
    ) {
        respond(
            request, status, ByteBuffer(string: body), contentType: contentType, extraHeaders: extraHeaders,
            context: context)
    }

    private func respond(
        _ request: HTTPRequestHead, _ status: HTTPResponseStatus, _ body: ByteBuffer,
        contentType: String = "text/plain; charset=utf-8", extraHeaders: [(String, String)] = [],
        context: ChannelHandlerContext
    ) {
        var headers = HTTPHeaders(extraHeaders)
        headers.add(name: "Content-Type", value: contentType)
        headers.add(name: "Content-Length", value: String(body.readableBytes))
        headers.add(name: "Cache-Control", value: "no-store")
        let keepAlive = request.isKeepAlive
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        if status == .upgradeRequired { headers.add(name: "Upgrade", value: "websocket") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: request.version, status: status, headers: headers))), promise: nil)
        if request.method != .HEAD {
            context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
        }
        let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        if !keepAlive {
            let channel = context.channel
            done.whenComplete { _ in channel.close(promise: nil) }
        } else {
            edge.responseEnded()
        }
    }
}
