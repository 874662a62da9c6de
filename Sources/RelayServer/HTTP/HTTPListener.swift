// HTTPListener: the TCP port for HTTP and WebSocket clients.
//
// Accepted by an Acceptor like the ingest socket, so that running out of
// descriptors refuses connections instead of spinning; each connection is
// handed to NIO with its HTTP pipeline, round-robin over the event loops.

#if canImport(Glibc)
import Glibc
#endif
import Logging
import NIOCore
import NIOPosix

final class HTTPListener: Sendable {
    /// The address the listener is bound to (with the real port when 0 was asked for).
    let address: SocketAddress
    private let acceptor: Acceptor
    private let owned: Bool

    private init(descriptor: CInt, owned: Bool) throws {
        acceptor = try Acceptor(descriptor: descriptor, name: "http-accept")
        self.owned = owned
        address = try SystemCalls.getsockname(descriptor)
    }

    /// Why `--listen` could not be bound, in words (NIO's `IOError` reads "bind(...) failed: ...) (errno: 98)").
    struct BindError: Error, CustomStringConvertible {
        let failure: SystemCallError
        let port: Int

        var description: String {
            let reason = failure.reason
            switch failure.code {
            case EADDRINUSE: return "cannot listen: \(reason) (another relay or server uses this port)"
            case EACCES where port < 1024:
                return "cannot listen: \(reason) (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
            case EADDRNOTAVAIL: return "cannot listen: \(reason) (no interface of this machine has that address)"
            default: return "cannot listen: \(failure.call): \(reason)"
            }
        }
    }

    /// Binds `host:port` (an IP address or `localhost`).
    static func bind(host: String, port: Int) throws -> HTTPListener {
        let address = try SocketAddress.makeAddressResolvingHost(host == "localhost" ? "127.0.0.1" : host, port: port)
        let family = address.protocol == .inet6 ? AF_INET6 : AF_INET
        let fd: CInt
        do {
            fd = try SystemCalls.socket(family, SOCK_STREAM)
        } catch {
            throw BindError(failure: error, port: port)
        }
        do {
            // SOL_SOCKET/SO_REUSEADDR needs no privilege (a restart rebinds past TIME_WAIT).
            try? SystemCalls.setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, 1)
            try SystemCalls.bind(fd, to: address)
            try SystemCalls.listen(fd, backlog: 1024)
        } catch {
            SystemCalls.close(fd)
            throw BindError(failure: error, port: port)
        }
        return try HTTPListener(descriptor: fd, owned: true)
    }

    /// Uses a listening socket handed over by systemd; it is never closed here.
    static func adopt(descriptor: CInt) throws -> HTTPListener {
        try HTTPListener(descriptor: descriptor, owned: false)
    }

    func start(
        group: any EventLoopGroup, logger: Logger,
        configure: @escaping @Sendable (any Channel) -> EventLoopFuture<Void>
    ) {
        acceptor.start(logger: logger) { connection in
            let setUp = ClientBootstrap(group: group)
                // IPPROTO_TCP level: `.socketOption(.tcp_nodelay)` is SOL_SOCKET option 1, SO_DEBUG,
                // which needs CAP_NET_ADMIN and failed every connection of an unprivileged relay.
                .channelOption(.tcpOption(.tcp_nodelay), value: 1)
                // A fixed send buffer turns off the kernel's autotuning, which grows each socket's
                // buffer up to tcp_wmem's maximum (4 MiB here): a subscriber that never reads would
                // make the relay copy up to 4 MiB into the kernel for it, per subscriber, before
                // --max-outbound-bytes (which counts shared frames) ever applies. The kernel doubles
                // the value; 256 KiB still covers a 100 Mbit/s link at 20 ms.
                .channelOption(.socketOption(.so_sndbuf), value: Self.sendBufferBytes)
                .channelInitializer(configure)
                .withConnectedSocket(connection)
            setUp.whenFailure { error in
                logger.warning("could not serve an HTTP connection", metadata: ["error": "\(error)"])
            }
            return setUp.map { _ in }
        }
    }

    /// `SO_SNDBUF` of every HTTP and WebSocket connection (see `start`).
    static let sendBufferBytes = 128 * 1024

    func stopAccepting() {
        acceptor.stop()
        if owned { SystemCalls.close(acceptor.descriptor) }
    }
}
