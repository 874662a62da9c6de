// One WebSocket connection to the relay: NIO's typed client upgrade, the token in the subprotocol
// (so it never sits in a URL), and the frames as text.

import NIOCore
import NIOHTTP1
import NIOPosix
import NIOWebSocket

/// `http://HOST:PORT[/prefix]` (or `ws://`): where `/ws` is.
public struct RelayEndpoint: Sendable, Equatable {
    public var host: String
    public var port: Int
    public var path: String

    public init(host: String, port: Int, path: String) {
        self.host = host
        self.port = port
        self.path = path
    }

    public init(url: String) throws(EndpointError) {
        var rest = Substring(url)
        if let range = rest.range(of: "://") {
            let scheme = rest[..<range.lowerBound].lowercased()
            guard scheme == "http" || scheme == "ws" else {
                throw EndpointError(
                    message: "--url \(url): only http:// and ws:// (watch speaks no TLS; use a local port or a tunnel)")
            }
            rest = rest[range.upperBound...]
        }
        let slash = rest.firstIndex(of: "/") ?? rest.endIndex
        var authority = rest[..<slash]
        var path = String(rest[slash...])
        if let query = path.firstIndex(where: { $0 == "?" || $0 == "#" }) { path = String(path[..<query]) }
        if authority.contains("@") { throw EndpointError(message: "--url \(url): no user info; give the token with --token-file") }
        var port = 80
        if authority.hasPrefix("[") {
            guard let close = authority.firstIndex(of: "]") else { throw EndpointError(message: "--url \(url): bad IPv6 address") }
            host = String(authority[authority.index(after: authority.startIndex)..<close])
            let after = authority[authority.index(after: close)...]
            if after.hasPrefix(":") {
                guard let value = Int(after.dropFirst()), (1...65535).contains(value) else {
                    throw EndpointError(message: "--url \(url): bad port")
                }
                port = value
            }
        } else {
            if let colon = authority.lastIndex(of: ":") {
                guard let value = Int(authority[authority.index(after: colon)...]), (1...65535).contains(value) else {
                    throw EndpointError(message: "--url \(url): bad port")
                }
                port = value
                authority = authority[..<colon]
            }
            host = String(authority)
        }
        self.port = port
        guard !host.isEmpty else { throw EndpointError(message: "--url \(url): no host") }
        while path.hasSuffix("/") { path.removeLast() }
        self.path = path.hasSuffix("/ws") ? path : path + "/ws"
    }

    /// The `Host` header: brackets around an IPv6 address, the port always.
    var hostHeader: String { (host.contains(":") ? "[\(host)]" : host) + ":\(port)" }
    public var description: String { "\(host.contains(":") ? "[\(host)]" : host):\(port)" }
}

public struct EndpointError: Error, Sendable {
    public let message: String
}

/// The upgrade's result: a WebSocket, or the HTTP status the relay answered instead.
enum Upgrade: Sendable {
    case websocket(NIOAsyncChannel<WebSocketFrame, WebSocketFrame>)
    case refused(NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>)
}

enum ConnectResult: Sendable {
    case websocket(NIOAsyncChannel<WebSocketFrame, WebSocketFrame>)
    case httpStatus(Int)
}

enum WatchConnection {
    static func connect(
        to endpoint: RelayEndpoint, token: String, group: any EventLoopGroup, timeout: TimeAmount = .seconds(10)
    ) async throws -> ConnectResult {
        let upgrade: EventLoopFuture<Upgrade> = try await ClientBootstrap(group: group)
            .connectTimeout(timeout)
            .connect(host: endpoint.host, port: endpoint.port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    // Events are at most 64 KiB of JSON plus the seq; a frame may be larger than
                    // NIO's 16 KiB default.
                    let upgrader = NIOTypedWebSocketClientUpgrader<Upgrade>(maxFrameSize: 1 << 20) { channel, _ in
                        channel.eventLoop.makeCompletedFuture {
                            try channel.pipeline.syncOperations.addHandlers(
                                IdleStateHandler(readTimeout: silenceLimit), CloseWhenSilent())
                            return .websocket(try NIOAsyncChannel(wrappingChannelSynchronously: channel))
                        }
                    }
                    var headers = HTTPHeaders()
                    headers.add(name: "Host", value: endpoint.hostHeader)
                    headers.add(name: "Sec-WebSocket-Protocol", value: "progress-relay.v1, bearer.\(token)")
                    headers.add(name: "Content-Length", value: "0")
                    let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: endpoint.path, headers: headers)
                    let configuration = NIOTypedHTTPClientUpgradeConfiguration<Upgrade>(
                        upgradeRequestHead: head, upgraders: [upgrader],
                        notUpgradingCompletionHandler: { channel in
                            channel.eventLoop.makeCompletedFuture {
                                .refused(try NIOAsyncChannel(wrappingChannelSynchronously: channel))
                            }
                        })
                    return try channel.pipeline.syncOperations.configureUpgradableHTTPClientPipeline(
                        configuration: .init(upgradeConfiguration: configuration))
                }
            }
        switch try await upgrade.get() {
        case .websocket(let channel):
            return .websocket(channel)
        case .refused(let channel):
            // The response head that refused the upgrade is handed on to this channel first.
            return try await channel.executeThenClose { inbound, _ in
                for try await part in inbound {
                    if case .head(let head) = part { return .httpStatus(Int(head.status.code)) }
                }
                return .httpStatus(0)
            }
        }
    }
}

/// A relay that vanished without a FIN (a host gone, a NAT that forgot us) would otherwise leave
/// the watch waiting forever; `Watcher` pings every `pingEvery`, so silence means the path is dead.
let silenceLimit = TimeAmount.seconds(60)
let pingEvery = Duration.seconds(20)

final class CloseWhenSilent: ChannelInboundHandler {
    typealias InboundIn = NIOAny

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case IdleStateHandler.IdleStateEvent.read = event {
            context.close(promise: nil)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }
}

extension WebSocketFrame {
    /// A client's frames must be masked (RFC 6455 §5.3).
    static func client(_ opcode: WebSocketOpcode, _ data: ByteBuffer) -> WebSocketFrame {
        WebSocketFrame(fin: true, opcode: opcode, maskKey: .random(), data: data)
    }
}
