// StateFileStore: reading and atomically replacing `--state-file`.

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import NIOCore
import RelayHub

enum StateFileStore {
    /// The topics in `path`, and the file is removed: it describes this moment only. A relay
    /// that is later killed leaves no file, so the next one starts new epochs instead of
    /// claiming a numbering that lost events. Nil when there is no file; throws on a damaged one.
    static func take(_ path: String) throws -> [TopicState]? {
        guard FileManager.default.fileExists(atPath: path) else { return nil }
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        unlink(path)
        return try StateFile.decode(ByteBuffer(bytes: data))
    }

    /// Writes to a temporary file beside `path`, syncs it, then renames it over `path`,
    /// so a crash leaves either the old state or the new one, never half of one.
    static func write(_ topics: [TopicState], to path: String) throws {
        let bytes = StateFile.encode(topics)
        let temporary = path + ".tmp"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
        var failure: Int32 = 0
        bytes.withUnsafeReadableBytes { raw in
            var offset = 0
            while offset < raw.count {
                let written = Glibc.write(fd, raw.baseAddress! + offset, raw.count - offset)
                if written < 0 {
                    if errno == EINTR { continue }
                    failure = errno
                    return
                }
                offset += written
            }
        }
        if failure == 0, fsync(fd) != 0 { failure = errno }
        close(fd)
        if failure == 0, rename(temporary, path) != 0 { failure = errno }
        if failure != 0 {
            unlink(temporary)
            throw POSIXError(POSIXErrorCode(rawValue: failure) ?? .EIO)
        }
        // The rename is durable only once the directory is synced too.
        let directory = open((path as NSString).deletingLastPathComponent.isEmpty ? "." : (path as NSString).deletingLastPathComponent, O_RDONLY | O_CLOEXEC)
        if directory >= 0 {
            fsync(directory)
            close(directory)
        }
    }
}
