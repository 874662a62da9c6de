// LineWriter: the background thread that owns the connection to the relay.

import Foundation

struct LineWriter {
    let queue: LineQueue
    let configuration: ProgressEmitter.Configuration
    /// Lines per write: one syscall carries many events when they come fast.
    private let batchLimit = 256

    init(queue: LineQueue, configuration: ProgressEmitter.Configuration) {
        self.queue = queue
        self.configuration = configuration
    }

    func run() {
        var connection: RelaySocket?
        var backoff = Duration.milliseconds(50)
        while queue.waitForLines() {
            // Connect before taking lines, so that while the relay is away every queued line
            // stays in the queue, where overflow drops the oldest.
            guard let socket = connection ?? connect() else {
                guard !queue.isClosed else { return }
                queue.pause(backoff)
                backoff = min(backoff * 2, configuration.maximumBackoff)
                continue
            }
            connection = socket
            backoff = .milliseconds(50)
            guard let batch = queue.take(limit: batchLimit) else { return }
            let bytes = batch.flatMap { $0 }
            let (written, failure) = bytes.withUnsafeBytes { socket.write(raw: $0) }
            // Lines wholly written are delivered; a line cut by the failure is resent whole.
            var done = 0
            var consumed = 0
            for line in batch {
                guard consumed + line.count <= written else { break }
                consumed += line.count
                done += 1
            }
            queue.confirm(done)
            queue.giveBack(Array(batch[done...]))
            queue.countRejected(Self.rejections(in: socket.readAvailable()))
            if failure != nil {
                connection = nil
            }
        }
    }

    private func connect() -> RelaySocket? {
        try? RelaySocket(path: configuration.socketPath)
    }

    private static func rejections(in answers: [UInt8]) -> Int {
        answers.reduce(0) { $1 == UInt8(ascii: "\n") ? $0 + 1 : $0 }
    }
}
