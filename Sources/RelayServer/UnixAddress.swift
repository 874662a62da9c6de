// UnixAddress: a filled-in `sockaddr_un` and its exact length.
//
// The ingest listener binds and probes one; the systemd notifier sends to one,
// which may be abstract. (ProgressEmitter has its own: it depends on nothing.)

#if canImport(Glibc)
import Glibc
#endif

package struct UnixAddress: Sendable {
    private var address = sockaddr_un()
    package let length: socklen_t

    /// `path` as a socket address, nil when it does not fit. With `allowingAbstract`, a leading `@`
    /// names an abstract address (Linux), as `$NOTIFY_SOCKET` may.
    package init?(_ path: String, allowingAbstract: Bool = false) {
        var bytes = Array(path.utf8)
        let abstract = allowingAbstract && bytes.first == UInt8(ascii: "@")
        if abstract { bytes[0] = 0 }
        // A path address carries its terminating zero; an abstract one is exactly its bytes.
        if !abstract { bytes.append(0) }
        guard !bytes.isEmpty, bytes.count <= MemoryLayout.size(ofValue: address.sun_path) else { return nil }
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
        length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count)
    }

    package func withSocketAddress<Result>(_ body: (UnsafePointer<sockaddr>, socklen_t) throws -> Result) rethrows -> Result {
        try withUnsafePointer(to: address) { pointer in
            try pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { try body($0, length) }
        }
    }
}
