using System.Net;
using System.Net.Sockets;
using Microsoft.Extensions.Logging;

using UblkSharp.Nbd.Protocol;
using UblkSharp.Runtime.Metrics;

namespace UblkSharp.Nbd;

/// <summary>
/// An NBD server: exports <see cref="Targets.BlockTarget"/>s on a TCP or Unix socket, with the
/// fixed newstyle handshake, structured replies, block status, and many concurrent connections.
/// One thread accepts; each connection has its own thread, and target calls that may block run
/// on a small shared pool of workers. Dispose stops accepting, lets every connection finish what
/// it has in flight, and closes them. A reaper thread enforces the handshake and idle timeouts.
/// </summary>
public sealed class NbdServer : IDisposable
{
    private readonly Socket _listener;
    private readonly Thread _acceptThread;
    private readonly Dictionary<long, NbdConnection> _connections = [];
    private readonly object _lock = new();
    private readonly string? _socketPath;
    private readonly List<IDisposable> _releaseWhenIdle = [];
    private readonly Thread _reaperThread;
    private readonly ManualResetEventSlim _stopReaper = new();
    // One line per 10 s for each kind of connection dropped in bulk (an attack must not flood the log).
    private readonly LogThrottle _refusedLog = new(TimeSpan.FromSeconds(10));
    private readonly LogThrottle _evictedLog = new(TimeSpan.FromSeconds(10));
    private readonly LogThrottle _handshakeLog = new(TimeSpan.FromSeconds(10));
    private readonly LogThrottle _idleLog = new(TimeSpan.FromSeconds(10));
    // A target that fails every request would otherwise log every request.
    private readonly LogThrottle _targetLog = new(TimeSpan.FromSeconds(10));
    // Failed TLS handshakes and plain clients against --tls require: anyone can cause them in bulk.
    private readonly LogThrottle _tlsLog = new(TimeSpan.FromSeconds(10));
    private readonly LogThrottle _tlsRequiredLog = new(TimeSpan.FromSeconds(10));
    private readonly ILogger _logger;
    private long _tlsFailures;
    private long _tlsRequiredRefusals;
    // Evicted connections still in the table (their threads are ending): they hold no slot.
    private int _evictPending;
    private long _evicted;
    private long _handshakeTimeouts;
    private long _idleClosed;
    private long _nextId;
    private long _accepted;
    private long _refusedConnections;
    private long _protocolErrors;
    private long _refusedRequests;
    private long _internalErrors;
    private long _targetExceptions;
    private long _served;
    private long _closed;
    // Each export's figures from its closed connections (under _lock, with the table: a connection
    // is counted either live or here, never both, never neither).
    private readonly Dictionary<NbdExport, QueueStatsSnapshot> _closedFigures = [];
    private volatile bool _disposed;

    private NbdServer(Socket listener, IReadOnlyList<NbdExport> exports, NbdServerOptions options, string? socketPath, NbdTlsContext? tls)
    {
        Tls = tls;
        _listener = listener;
        Exports = exports;
        Options = options;
        _logger = options.LoggerFactory.CreateLogger<NbdServer>();
        _socketPath = socketPath;
        Address = NbdAddress.FromEndPoint(listener.LocalEndPoint!);
        if (socketPath is not null)
        {
            Address = NbdAddress.Unix(socketPath);
        }
        Workers = new NbdWorkerPool(options.Workers, NoteInternalError);
        _acceptThread = new Thread(AcceptLoop) { IsBackground = true, Name = "nbd-accept" };
        _reaperThread = new Thread(ReapLoop) { IsBackground = true, Name = "nbd-reaper" };
    }

    /// <summary>Where the server listens (with the actual port when port 0 was asked for).</summary>
    public NbdAddress Address { get; }

    public IReadOnlyList<NbdExport> Exports { get; }

    public NbdServerOptions Options { get; }

    internal NbdWorkerPool Workers { get; }

    /// <summary>Connections open now.</summary>
    public int ActiveConnections
    {
        get
        {
            lock (_lock)
            {
                return _connections.Count;
            }
        }
    }

    public long ConnectionsAccepted => Interlocked.Read(ref _accepted);

    /// <summary>
    /// Connections closed at once because <see cref="NbdServerOptions.MaxConnections"/> were open,
    /// all past their handshake.
    /// </summary>
    public long ConnectionsRefused => Interlocked.Read(ref _refusedConnections);

    /// <summary>Connections still in their handshake closed to make room for a new one (MaxConnections were open).</summary>
    public long ConnectionsEvicted => Interlocked.Read(ref _evicted);

    /// <summary>Connections closed for not finishing the handshake within <see cref="NbdServerOptions.HandshakeTimeout"/>.</summary>
    public long HandshakeTimeouts => Interlocked.Read(ref _handshakeTimeouts);

    /// <summary>Connections closed after <see cref="NbdServerOptions.IdleTimeout"/> without a request.</summary>
    public long IdleConnectionsClosed => Interlocked.Read(ref _idleClosed);

    /// <summary>TLS handshakes that failed (bad or untrusted client certificate, garbage, a client that went away).</summary>
    public long TlsFailures => Interlocked.Read(ref _tlsFailures);

    /// <summary>Options refused with NBD_REP_ERR_TLS_REQD, or EXPORT_NAME connections ended, because TLS was required and not yet on.</summary>
    public long TlsRequiredRefusals => Interlocked.Read(ref _tlsRequiredRefusals);

    /// <summary>Shared by every TLS handshake; null without TLS.</summary>
    internal NbdTlsContext? Tls { get; }

    internal NbdTlsMode TlsMode => Tls?.Mode ?? NbdTlsMode.Off;

    /// <summary>Clients cut off for breaking the protocol (bad magic, unknown flags, oversized messages).</summary>
    public long ProtocolErrors => Interlocked.Read(ref _protocolErrors);

    /// <summary>Requests answered with an error before reaching the target (bad range, flags, command).</summary>
    public long RequestsRefused => Interlocked.Read(ref _refusedRequests);

    /// <summary>Requests that reached the target and were replied to.</summary>
    public long RequestsServed => Interlocked.Read(ref _served);

    /// <summary>Exceptions thrown by targets (each failed one request with EIO).</summary>
    public long TargetExceptions => Interlocked.Read(ref _targetExceptions);

    /// <summary>Bugs in the server itself that ended a connection; 0 unless something is wrong.</summary>
    public long InternalErrors => Interlocked.Read(ref _internalErrors);

    public int WorkerThreads => Workers.ThreadCount;

    public static NbdServer Start(NbdAddress address, NbdExport export, NbdServerOptions? options = null)
        => Start(address, [export], options);

    /// <summary>Binds, listens and starts accepting. Throws <see cref="IOException"/> naming the address when it cannot listen.</summary>
    public static NbdServer Start(NbdAddress address, IReadOnlyList<NbdExport> exports, NbdServerOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(address);
        ArgumentNullException.ThrowIfNull(exports);
        if (exports.Count == 0)
        {
            throw new ArgumentException("an NBD server needs at least one export");
        }
        if (exports.Select(e => e.Name).Distinct(StringComparer.Ordinal).Count() != exports.Count)
        {
            throw new ArgumentException("two exports have the same name");
        }
        options ??= new NbdServerOptions();
        options.Validate();
        // Before listening: credentials that cannot be used (no GnuTLS for PSK) leave nothing behind.
        var tls = options.Tls is { Mode: not NbdTlsMode.Off } t ? new NbdTlsContext(t) : null;
        Socket listener;
        try
        {
            listener = Listen(address);
        }
        catch
        {
            tls?.Dispose();
            throw;
        }
        var server = new NbdServer(listener, exports, options, address.SocketPath, tls);
        server._acceptThread.Start();
        server._reaperThread.Start();
        UblkMeter.AddNbd(server, server.Stats);
        return server;
    }

    private static Socket Listen(NbdAddress address)
    {
        var endPoint = address.ResolveEndPoints()[0];
        Socket? socket = null;
        try
        {
            if (endPoint is UnixDomainSocketEndPoint)
            {
                RemoveStaleSocket(address.SocketPath!);
                socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            }
            else
            {
                socket = new Socket(endPoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
                socket.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
                if (endPoint.AddressFamily == AddressFamily.InterNetworkV6)
                {
                    socket.DualMode = ((IPEndPoint)endPoint).Address.Equals(IPAddress.IPv6Any);
                }
            }
            socket.Bind(endPoint);
            // A burst of connects beyond the backlog has its SYNs dropped, and each such client
            // waits a second for the retry: 1024 (the default MaxConnections) rides out a flood.
            socket.Listen(1024);
            return socket;
        }
        catch (SocketException e)
        {
            socket?.Dispose();
            throw new IOException($"cannot listen on {address}: {e.Message}", e);
        }
    }

    // A socket file left by a server that died is in the way of bind; one that answers is in use.
    private static void RemoveStaleSocket(string path)
    {
        if (!File.Exists(path) && !Directory.Exists(path))
        {
            return;
        }
        if (!UnixSocketFile.IsSocket(path))
        {
            throw new IOException($"cannot listen on unix://{path}: the path exists and is not a socket");
        }
        using var probe = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            probe.Connect(new UnixDomainSocketEndPoint(path));
        }
        catch (SocketException)
        {
            File.Delete(path);
            return;
        }
        throw new IOException($"cannot listen on unix://{path}: another server is listening there");
    }

    internal NbdExport? FindExport(string name)
    {
        foreach (var e in Exports)
        {
            if (e.Name == name)
            {
                return e;
            }
        }
        // The empty name is the default export.
        return name.Length == 0 ? Exports[0] : null;
    }

    private void AcceptLoop()
    {
        while (!_disposed)
        {
            Socket client;
            try
            {
                client = _listener.Accept();
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException)
            {
                if (_disposed)
                {
                    return;
                }
                // Out of fds, or a connection reset before accept: keep serving.
                NbdLog.AcceptFailed(_logger, e.Message);
                Thread.Sleep(50);
                continue;
            }
            Interlocked.Increment(ref _accepted);
            NbdConnection connection;
            NbdConnection? evict = null;
            lock (_lock)
            {
                if (!_disposed && _connections.Count - _evictPending >= Options.MaxConnections)
                {
                    // A client that is slow to finish its handshake (a slowloris) must not keep a
                    // real one out: the newcomer takes the oldest handshake's place.
                    evict = OldestHandshake();
                    if (evict is not null)
                    {
                        evict.Evicted = true;
                        _evictPending++;
                    }
                }
                if (_disposed || (evict is null && _connections.Count - _evictPending >= Options.MaxConnections))
                {
                    Interlocked.Increment(ref _refusedConnections);
                    client.Dispose();
                    if (!_disposed && _refusedLog.ShouldLog(out var more))
                    {
                        NbdLog.ConnectionRefused(_logger, Options.MaxConnections, LogThrottle.More(more));
                    }
                    continue;
                }
                if (client.AddressFamily is AddressFamily.InterNetwork or AddressFamily.InterNetworkV6)
                {
                    client.NoDelay = true;
                }
                connection = new NbdConnection(this, client, ++_nextId);
                _connections.Add(connection.Id, connection);
            }
            if (evict is not null)
            {
                Interlocked.Increment(ref _evicted);
                evict.Abort();
                if (_evictedLog.ShouldLog(out var more))
                {
                    NbdLog.HandshakeEvicted(_logger, Options.MaxConnections, LogThrottle.More(more));
                }
            }
            try
            {
                connection.Start();
            }
            catch (OutOfMemoryException)
            {
                // No thread could be made: drop the connection.
                lock (_lock)
                {
                    _connections.Remove(connection.Id);
                    _closed++;
                }
                client.Dispose();
            }
        }
    }

    // Under _lock. The oldest: a real client's handshake takes a few round trips, so to cut it off
    // an attacker must open as many connections as are older than it within those round trips.
    private NbdConnection? OldestHandshake()
    {
        NbdConnection? oldest = null;
        foreach (var c in _connections.Values)
        {
            if (c.InHandshake && !c.Evicted && (oldest is null || c.Id < oldest.Id))
            {
                oldest = c;
            }
        }
        return oldest;
    }

    // The handshake deadline counts from accept, so a client trickling a byte at a time cannot
    // stretch it (a receive timeout alone restarts with every byte); idle connections are closed
    // as the client's end of the stream would close them: in-flight replies go out first.
    private void ReapLoop()
    {
        var handshakeMs = (long)Options.HandshakeTimeout.TotalMilliseconds;
        var idleMs = (long)Options.IdleTimeout.TotalMilliseconds;
        var shortest = idleMs > 0 ? Math.Min(handshakeMs, idleMs) : handshakeMs;
        var period = TimeSpan.FromMilliseconds(Math.Clamp(shortest / 4, 20, 1000));
        var batch = new List<NbdConnection>();
        while (!_stopReaper.Wait(period))
        {
            batch.Clear();
            lock (_lock)
            {
                foreach (var c in _connections.Values)
                {
                    if (!c.Evicted)
                    {
                        batch.Add(c);
                    }
                }
            }
            var now = Environment.TickCount64;
            foreach (var c in batch)
            {
                if (c.InHandshake && now - c.AcceptedAt >= handshakeMs && c.ClaimReap())
                {
                    // Counted first: whoever sees the connection end sees it counted.
                    Interlocked.Increment(ref _handshakeTimeouts);
                    c.Abort();
                    if (_handshakeLog.ShouldLog(out var more))
                    {
                        NbdLog.HandshakeTimedOut(_logger, Options.HandshakeTimeout.TotalSeconds, LogThrottle.More(more));
                    }
                }
                else if (idleMs > 0 && c.IsIdle(now, idleMs) && c.ClaimReap())
                {
                    Interlocked.Increment(ref _idleClosed);
                    c.Shutdown();
                    if (_idleLog.ShouldLog(out var more))
                    {
                        var suffix = LogThrottle.More(more);
                        NbdLog.IdleClosed(_logger, Options.IdleTimeout.TotalSeconds, suffix);
                    }
                }
            }
        }
    }

    internal void Remove(NbdConnection connection)
    {
        IDisposable[] release = [];
        // Taken before the lock: the connection has nothing in flight any more, so these are its last figures.
        var figures = connection.Stats();
        lock (_lock)
        {
            _connections.Remove(connection.Id);
            _closed++;
            if (figures is not null)
            {
                var export = connection.StatsExport!;
                var closed = figures.Figures with { InFlight = 0 };
                _closedFigures[export] = _closedFigures.TryGetValue(export, out var before) ? QueueStatsSnapshot.Sum(-1, [before, closed]) : closed;
            }
            if (connection.Evicted)
            {
                _evictPending--;
            }
            Monitor.PulseAll(_lock);
            if (_connections.Count == 0 && _releaseWhenIdle.Count > 0)
            {
                // The last connection outlived Dispose; its calls have returned (it has waited for them).
                release = [.. _releaseWhenIdle];
                _releaseWhenIdle.Clear();
            }
        }
        Release(release);
    }

    /// <summary>
    /// True once the server is disposed and no connection is left, so no thread of this server
    /// can be inside an export's target any more.
    /// </summary>
    public bool IsIdle
    {
        get
        {
            lock (_lock)
            {
                return _disposed && _connections.Count == 0;
            }
        }
    }

    /// <summary>
    /// Disposes <paramref name="resource"/> (normally an export's target) once the server is
    /// disposed and no connection is left: at once if that is so already, else when the last
    /// connection still finishing a call after <see cref="Dispose"/> leaves. Never while a thread
    /// of this server may be inside it. Returns whether it was disposed at once.
    /// </summary>
    public bool ReleaseWhenIdle(IDisposable resource)
    {
        ArgumentNullException.ThrowIfNull(resource);
        lock (_lock)
        {
            if (!(_disposed && _connections.Count == 0))
            {
                _releaseWhenIdle.Add(resource);
                return false;
            }
        }
        Release([resource]);
        return true;
    }

    private void Release(IDisposable[] resources)
    {
        foreach (var r in resources)
        {
            try
            {
                r.Dispose();
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                NbdLog.CloseTargetFailed(_logger, e);
            }
        }
    }

    /// <summary>
    /// The figures now: connections, each export's requests (its closed connections' and its live
    /// ones'), and each live connection's. Allocates; meant for a scrape, not for every request.
    /// </summary>
    public NbdServerStats Stats()
    {
        var taken = DateTimeOffset.UtcNow.ToUnixTimeMilliseconds();
        var connections = new List<NbdConnectionStats>();
        var parts = new Dictionary<NbdExport, (int Live, List<QueueStatsSnapshot> Figures)>();
        int open;
        long closed;
        lock (_lock)
        {
            open = _connections.Count;
            closed = _closed;
            foreach (var e in Exports)
            {
                parts[e] = (0, _closedFigures.TryGetValue(e, out var c) ? [c] : []);
            }
            foreach (var c in _connections.Values.OrderBy(c => c.Id))
            {
                if (c.Stats() is { } figures)
                {
                    connections.Add(figures);
                    var (live, list) = parts[c.StatsExport!];
                    list.Add(figures.Figures);
                    parts[c.StatsExport!] = (live + 1, list);
                }
            }
        }
        var exports = Exports.Select(e => new NbdExportStats(e.Name, parts[e].Live, QueueStatsSnapshot.Sum(-1, parts[e].Figures))).ToList();
        return new NbdServerStats(Address.ToString(), taken, open, ConnectionsAccepted, closed, ConnectionsRefused, exports, connections);
    }

    // The line is written before the count moves: whoever sees the count (a test, `stats`) finds the line.
    internal void NoteProtocolError(string what)
    {
        NbdLog.ProtocolError(_logger, what);
        Interlocked.Increment(ref _protocolErrors);
    }

    internal void NoteTlsFailure(string reason)
    {
        if (_tlsLog.ShouldLog(out var more))
        {
            NbdLog.TlsFailed(_logger, reason, LogThrottle.More(more));
        }
        Interlocked.Increment(ref _tlsFailures);
    }

    internal void NoteTlsStarted(string session, string? pskUser)
    {
        if (pskUser is null)
        {
            NbdLog.TlsStarted(_logger, session);
        }
        else
        {
            // Who came in matters with PSK: a key file may hold many users, and one may be revoked.
            NbdLog.TlsPskStarted(_logger, pskUser, session);
        }
    }

    internal void NoteTlsRequired(uint option)
    {
        if (_tlsRequiredLog.ShouldLog(out var more))
        {
            NbdLog.TlsRequired(_logger, NbdProtocol.OptionName(option), LogThrottle.More(more));
        }
        Interlocked.Increment(ref _tlsRequiredRefusals);
    }

    internal void NoteRefused() => Interlocked.Increment(ref _refusedRequests);

    internal void NoteServed() => Interlocked.Increment(ref _served);

    internal void NoteTargetException(NbdRequest request, Exception e)
    {
        if (_targetLog.ShouldLog(out var more))
        {
            NbdLog.TargetThrew(_logger, NbdProtocol.CommandName(request.Type), request.Offset, LogThrottle.More(more), e);
        }
        Interlocked.Increment(ref _targetExceptions);
    }

    internal void NoteInternalError(Exception e)
    {
        NbdLog.InternalError(_logger, e);
        Interlocked.Increment(ref _internalErrors);
    }

    /// <summary>
    /// Stops accepting, lets each connection finish its requests in flight, and closes them, waiting
    /// up to <see cref="NbdServerOptions.StopTimeout"/>. A connection still inside a target call
    /// after that is left to finish on its own (<see cref="IsIdle"/> stays false until it has).
    /// </summary>
    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed)
            {
                return;
            }
            // Under the lock: IsIdle and ReleaseWhenIdle must never see "disposed" before the accept loop can no longer add a connection.
            _disposed = true;
        }
        _listener.Dispose();
        _acceptThread.Join(TimeSpan.FromSeconds(10));
        _stopReaper.Set();
        if (_reaperThread.Join(TimeSpan.FromSeconds(10)))
        {
            _stopReaper.Dispose();
        }
        NbdConnection[] open;
        lock (_lock)
        {
            open = [.. _connections.Values];
        }
        foreach (var c in open)
        {
            c.Shutdown();
        }
        var deadline = Environment.TickCount64 + (long)Options.StopTimeout.TotalMilliseconds;
        int left;
        lock (_lock)
        {
            while (_connections.Count > 0 && Environment.TickCount64 < deadline)
            {
                Monitor.Wait(_lock, 100);
            }
            left = _connections.Count;
        }
        if (left > 0)
        {
            NbdLog.StillBusy(_logger, left, Options.StopTimeout.TotalSeconds);
        }
        Workers.Dispose(TimeSpan.FromMilliseconds(Math.Max(0, deadline - Environment.TickCount64)));
        Tls?.Dispose(); // a connection still open keeps the PSK credentials alive until it ends
        UblkMeter.RemoveNbd(this);
        if (_socketPath is not null)
        {
            try
            {
                File.Delete(_socketPath);
            }
            catch (IOException)
            {
            }
        }
    }
}
