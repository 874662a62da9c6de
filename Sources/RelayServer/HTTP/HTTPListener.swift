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
        address = try Self.localAddress(of: descriptor)
    }

    /// Binds `host:port` (an IP address or `localhost`).
    static func bind(host: String, port: Int) throws -> HTTPListener {
        let address = try SocketAddress.makeAddressResolvingHost(host == "localhost" ? "127.0.0.1" : host, port: port)
        let family = address.protocol == .inet6 ? AF_INET6 : AF_INET
        let fd = socket(family, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw IOError(errnoCode: errno, reason: "socket") }
        var one: Int32 = 1
        _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let bound = address.withSockAddr { pointer, length in Glibc.bind(fd, pointer, socklen_t(length)) }
        guard bound == 0, listen(fd, 1024) == 0 else {
            let code = errno
            close(fd)
            throw IOError(errnoCode: code, reason: "bind")
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
            ClientBootstrap(group: group)
                .channelOption(.socketOption(.tcp_nodelay), value: 1)
                .channelInitializer(configure)
                .withConnectedSocket(connection)
                .whenFailure { error in
                    logger.warning("could not serve an HTTP connection", metadata: ["error": "\(error)"])
                }
        }
    }

    func stopAccepting() {
        acceptor.stop()
        if owned { close(acceptor.descriptor) }
    }

    private static func localAddress(of fd: CInt) throws -> SocketAddress {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let result = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard result == 0 else { throw IOError(errnoCode: errno, reason: "getsockname") }
        switch Int32(storage.ss_family) {
        case AF_INET6:
            let v6 = withUnsafePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { $0.pointee } }
            return SocketAddress(v6, host: "")
        default:
            let v4 = withUnsafePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee } }
            return SocketAddress(v4, host: "")
        }
    }
}
