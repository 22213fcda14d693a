using System.Net.Sockets;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using UblkSharp.Interop;
using UblkSharp.Nbd.Protocol;

namespace UblkSharp.Targets;

/// <summary>How an <see cref="NbdTarget"/> connects and how long it keeps trying.</summary>
public sealed record NbdTargetOptions
{
    /// <summary>Connections to the server at most (callers beyond wait); 1 if the server lacks CAN_MULTI_CONN.</summary>
    public int Connections { get; init; } = 8;

    public TimeSpan ConnectTimeout { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>
    /// The longest one request may take, its reconnects and retries included: every send and
    /// receive is bounded by what is left of it, so a server that stops answering (even one that
    /// vanished without closing the connection) fails the request with EIO instead of hanging the
    /// device. Once a request has given up, later ones try once each until one gets through.
    /// </summary>
    public TimeSpan Timeout { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>
    /// The x509 credentials for an nbds URI (else its <c>?tls-certificates=DIR</c> is loaded). Given
    /// for a plain nbd URI, it is refused: TLS is asked for by the URI.
    /// </summary>
    public NbdClientTlsOptions? Tls { get; init; }

    /// <summary>Where dropped connections and failed reconnects are reported (the first few per queue); by default nowhere.</summary>
    public ILoggerFactory LoggerFactory { get; init; } = NullLoggerFactory.Instance;
}

/// <summary>
/// A remote NBD export as a target (like ublksrv's nbd target). A ublk device serves it on each
/// queue's own io_uring (<see cref="NbdUringBackend"/>: a connection per queue, every tag in flight
/// on it, a deadline per request). Callers of the synchronous methods (our NBD server's workers,
/// re-exporting it) take a connection each from a small pool. Either way a broken connection is
/// dropped and the request sent again on a new one, for up to <see cref="NbdTargetOptions.Timeout"/>
/// in all: NBD requests are idempotent, so replaying one whose reply was lost is safe. Requests
/// larger than the server's maximum are served in parts (short counts, which callers continue).
/// </summary>
public sealed class NbdTarget : BlockTarget
{
    private const uint MaxRangeChunk = 1u << 30;
    private readonly object _lock = new();
    private readonly Stack<NbdClient> _idle = new();
    private readonly NbdTargetOptions _options;
    private readonly int _maxConnections;
    private readonly uint _maxPayload;
    private readonly ushort _flags;
    private readonly long _remoteSize;
    private readonly NbdClientTlsOptions? _tls;
    private int _open;
    private long _reconnects;
    private volatile bool _down;
    private bool _disposed;

    public NbdTarget(NbdUri uri, NbdTargetOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(uri);
        _options = options ?? new NbdTargetOptions();
        if (_options.Connections < 1)
        {
            throw new ArgumentOutOfRangeException(nameof(options), "an nbd target needs at least one connection");
        }
        if (_options.Timeout <= TimeSpan.Zero)
        {
            throw new ArgumentOutOfRangeException(nameof(options), "an nbd target's timeout must be positive");
        }
        if (_options.Tls is not null && !uri.IsTls)
        {
            throw new ArgumentException($"{uri}: TLS certificates were given for a plain NBD URI; use nbds:// (or nbds+unix://) for TLS");
        }
        try
        {
            _tls = _options.Tls ?? (uri.IsTls ? TlsOf(uri) : null);
        }
        catch (ArgumentException e)
        {
            throw new ArgumentException($"{uri}: {e.Message}", e);
        }
        if (uri.IsTls && _tls is null)
        {
            throw new ArgumentException($"{uri}: TLS needs a directory with ca-cert.pem (to check the server) and, for a server that verifies clients, client-cert.pem and client-key.pem: --tls-certificates DIR or ?tls-certificates=DIR; or, for TLS-PSK, a psktool key file: --tls-psk FILE or ?tls-psk-file=FILE");
        }
        Uri = uri;
        Logger = (_options.LoggerFactory ?? NullLoggerFactory.Instance).CreateLogger<NbdTarget>();
        var first = NbdClient.Connect(uri, _options.ConnectTimeout, _options.Timeout, _tls);
        if (first.TlsDescription is { } description)
        {
            TargetLog.NbdTls(Logger, LogLevel.Information, uri.Text, description);
        }
        _remoteSize = first.Size;
        _flags = first.Flags;
        _maxPayload = Math.Max(first.MaximumPayload, 4096);
        MinimumBlockSize = (int)Math.Clamp(first.MinimumBlockSize, 1, 4096);
        // ublk sizes are whole sectors: a tail shorter than one is not part of the device.
        Size = first.Size & ~511L;
        if (Size == 0)
        {
            first.Dispose();
            throw new ArgumentException($"{uri}: the export is {first.Size} bytes; a device needs at least 512");
        }
        // Without CAN_MULTI_CONN one connection's flush need not cover another's writes: use one.
        _maxConnections = first.CanMultiConn ? _options.Connections : 1;
        _idle.Push(first);
        _open = 1;
    }

    public NbdUri Uri { get; }

    /// <summary>The credentials an nbds URI names itself (?tls-psk-file= with its user, as libnbd: the login name by default; or ?tls-certificates=).</summary>
    internal static NbdClientTlsOptions? TlsOf(NbdUri uri)
        => !string.IsNullOrEmpty(uri.TlsPskFile) ? NbdClientTlsOptions.LoadPsk(uri.TlsPskFile, uri.TlsUsername ?? Environment.UserName)
            : !string.IsNullOrEmpty(uri.TlsCertificates) ? NbdClientTlsOptions.Load(uri.TlsCertificates)
            : null;

    internal ILogger Logger { get; }

    internal NbdTargetOptions Options => _options;

    /// <summary>The largest READ/WRITE the server takes.</summary>
    internal uint MaxPayload => _maxPayload;

    public override long Size { get; }

    public override string Kind => "nbd";

    public override IReadOnlyDictionary<string, string> Recipe
    {
        get
        {
            var recipe = new Dictionary<string, string>
            {
                ["uri"] = Uri.Text,
                ["timeout"] = ((int)Math.Ceiling(_options.Timeout.TotalSeconds)).ToString(System.Globalization.CultureInfo.InvariantCulture),
            };
            // A directory from the URI is in the URI; one given apart must be kept for a restart.
            if (_options.Tls?.Directory is { } directory)
            {
                recipe["tls-certificates"] = directory;
            }
            // The key file by path, never the key.
            if (_options.Tls?.PskFile is { } pskFile)
            {
                recipe["tls-psk"] = pskFile;
                recipe["tls-username"] = _options.Tls.PskUsername!;
            }
            return recipe;
        }
    }

    /// <summary>The server's minimum block size (1 if it gave none).</summary>
    public int MinimumBlockSize { get; }

    /// <summary>Connections dropped and made again after a failure.</summary>
    public long Reconnects => Interlocked.Read(ref _reconnects);

    public int OpenConnections
    {
        get
        {
            lock (_lock)
            {
                return _open;
            }
        }
    }

    /// <summary>The data lives on the server: a new daemon that reconnects sees all of it.</summary>
    public override bool SurvivesRestart => true;

    public override int LogicalBlockSize => Math.Max(512, MinimumBlockSize);

    public override bool IsReadOnly => (_flags & NbdProtocol.FlagReadOnly) != 0;

    public override bool HasVolatileCache => (_flags & NbdProtocol.FlagSendFlush) != 0;

    public override bool HasNativeFua => (_flags & NbdProtocol.FlagSendFua) != 0;

    public override bool CanDiscard => !IsReadOnly && (_flags & NbdProtocol.FlagSendTrim) != 0;

    /// <summary>Only when the server takes WRITE_ZEROES: otherwise the kernel writes the zeros itself.</summary>
    public override bool CanWriteZeroes => !IsReadOnly && (_flags & NbdProtocol.FlagSendWriteZeroes) != 0;

    /// <summary>False: a zero is passed on without FAST_ZERO, so whether it is fast is the server's business.</summary>
    public override bool CanFastZero => false;

    public override bool IsRotational => (_flags & NbdProtocol.FlagRotational) != 0;

    /// <summary>
    /// Each queue's IO on its own ring and connection. Without CAN_MULTI_CONN a server's flush covers
    /// only its own connection's writes, so such a server is served by one queue.
    /// </summary>
    public override UringBackend? CreateUringBackend(int queueId)
    {
        if (queueId > 0 && _maxConnections == 1)
        {
            throw new NotSupportedException($"{Uri}: only one connection may be used (the server does not offer CAN_MULTI_CONN, so a flush on one connection need not cover another's writes): serve it with one queue (-q 1)");
        }
        NbdClient? first = null;
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (_idle.Count > 0)
            {
                // The backend owns it now; the pool counts it no more.
                first = _idle.Pop();
                _open--;
            }
        }
        return new NbdUringBackend(this, queueId, first);
    }

    /// <summary>
    /// The ring backend moves each payload between the socket and the request's pages
    /// (READ_FIXED/WRITE_FIXED on the request's buffer-table slot): zero copy where the kernel has
    /// it. Over TLS the socket is the local end of the connection's relay, which still copies.
    /// </summary>
    public override bool SupportsZeroCopy => true;

    /// <summary>A new connection to the same export (blocking: the ring backend calls it on a thread of its own).</summary>
    internal NbdClient Connect(TimeSpan timeout)
    {
        var client = NbdClient.Connect(Uri, timeout, default, _tls);
        if (client.Size != _remoteSize)
        {
            client.Dispose();
            throw new NbdHandshakeException($"{Uri}: the export's size changed from {_remoteSize} to {client.Size} bytes");
        }
        if (client.TlsDescription is { } description)
        {
            TargetLog.NbdTls(Logger, LogLevel.Debug, Uri.Text, description);
        }
        return client;
    }

    internal void CountReconnect() => Interlocked.Increment(ref _reconnects);

    public override int Read(Span<byte> buffer, long offset)
    {
        var n = (int)Math.Min(buffer.Length, _maxPayload);
        var r = Call(Op.Read, buffer[..n], ReadOnlySpan<byte>.Empty, offset, (uint)n, false);
        return r < 0 ? r : n;
    }

    public override int Write(ReadOnlySpan<byte> data, long offset) => Write(data, offset, false);

    public override int WriteFua(ReadOnlySpan<byte> data, long offset) => HasNativeFua ? Write(data, offset, true) : base.WriteFua(data, offset);

    private int Write(ReadOnlySpan<byte> data, long offset, bool fua)
    {
        if (IsReadOnly)
        {
            return -Errno.EROFS;
        }
        var n = (int)Math.Min(data.Length, _maxPayload);
        var r = Call(Op.Write, Span<byte>.Empty, data[..n], offset, (uint)n, fua);
        return r < 0 ? r : n;
    }

    public override int Flush() => HasVolatileCache ? Call(Op.Flush, Span<byte>.Empty, ReadOnlySpan<byte>.Empty, 0, 0, false) : 0;

    public override int Discard(long offset, long length) => CanDiscard ? Ranges(Op.Trim, offset, length) : -Errno.EOPNOTSUPP;

    public override int WriteZeroes(long offset, long length, bool mayUnmap)
    {
        if (IsReadOnly)
        {
            return -Errno.EROFS;
        }
        if ((_flags & NbdProtocol.FlagSendWriteZeroes) == 0)
        {
            return base.WriteZeroes(offset, length, mayUnmap);
        }
        return Ranges(mayUnmap ? Op.Zero : Op.ZeroNoHole, offset, length);
    }

    public override int Cache(long offset, long length) => (_flags & NbdProtocol.FlagSendCache) != 0 ? Ranges(Op.Cache, offset, length) : 0;

    private int Ranges(Op op, long offset, long length)
    {
        while (length > 0)
        {
            var n = (uint)Math.Min(length, MaxRangeChunk);
            var r = Call(op, Span<byte>.Empty, ReadOnlySpan<byte>.Empty, offset, n, false);
            if (r < 0)
            {
                return r;
            }
            offset += n;
            length -= n;
        }
        return 0;
    }

    private enum Op
    {
        Read,
        Write,
        Flush,
        Trim,
        Zero,
        ZeroNoHole,
        Cache,
    }

    private int Call(Op op, Span<byte> readBuffer, ReadOnlySpan<byte> writeData, long offset, uint length, bool fua)
    {
        // After a request has given up, the next ones try once each until the server is back.
        var start = Environment.TickCount64;
        var timeoutMs = (long)_options.Timeout.TotalMilliseconds;
        var deadline = start + (_down ? 0 : timeoutMs);
        var backoff = 50;
        var first = true;
        while (true)
        {
            NbdClient? client = null;
            try
            {
                // A first attempt gets the whole timeout; a retry only what is left of it (at least
                // 100 ms, for the one try a request makes while the server is down).
                var left = first ? _options.Timeout : TimeSpan.FromMilliseconds(Math.Max(100, start + timeoutMs - Environment.TickCount64));
                first = false;
                client = Acquire(left);
                client.IoTimeout = left;
                var r = op switch
                {
                    Op.Read => client.Read(readBuffer, offset),
                    Op.Write => client.Write(writeData, offset, fua),
                    Op.Flush => client.Flush(),
                    Op.Trim => client.Trim(offset, length, false),
                    Op.Zero => client.WriteZeroes(offset, length, mayUnmap: true, fua: false, fast: false),
                    Op.ZeroNoHole => client.WriteZeroes(offset, length, mayUnmap: false, fua: false, fast: false),
                    Op.Cache => client.Cache(offset, length),
                    _ => -Errno.EINVAL,
                };
                Release(client);
                _down = false;
                return r;
            }
            catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException)
            {
                if (client is not null)
                {
                    Drop(client);
                }
                if (_disposed)
                {
                    return -Errno.EIO;
                }
                if (e is NbdHandshakeException)
                {
                    // The server is back but refuses the export: retrying will not help.
                    _down = true;
                    return -Errno.EIO;
                }
            }
            if (Environment.TickCount64 >= deadline)
            {
                _down = true;
                return -Errno.EIO;
            }
            Thread.Sleep((int)Math.Min(backoff, Math.Max(1, deadline - Environment.TickCount64)));
            backoff = Math.Min(backoff * 2, 1000);
        }
    }

    private NbdClient Acquire(TimeSpan left)
    {
        lock (_lock)
        {
            while (true)
            {
                ObjectDisposedException.ThrowIf(_disposed, this);
                if (_idle.Count > 0)
                {
                    return _idle.Pop();
                }
                if (_open < _maxConnections)
                {
                    _open++;
                    break;
                }
                Monitor.Wait(_lock);
            }
        }
        try
        {
            var client = Connect(left < _options.ConnectTimeout ? left : _options.ConnectTimeout);
            client.IoTimeout = left;
            return client;
        }
        catch
        {
            lock (_lock)
            {
                _open--;
                Monitor.Pulse(_lock);
            }
            throw;
        }
    }

    private void Release(NbdClient client)
    {
        lock (_lock)
        {
            _idle.Push(client);
            Monitor.Pulse(_lock);
        }
    }

    private void Drop(NbdClient client)
    {
        client.Dispose();
        Interlocked.Increment(ref _reconnects);
        lock (_lock)
        {
            _open--;
            // The others were opened to the same server and most likely broke with it.
            while (_idle.Count > 0)
            {
                _idle.Pop().Dispose();
                _open--;
            }
            Monitor.PulseAll(_lock);
        }
    }

    protected override void Dispose(bool disposing)
    {
        lock (_lock)
        {
            _disposed = true;
            while (_idle.Count > 0)
            {
                _idle.Pop().Dispose();
                _open--;
            }
            Monitor.PulseAll(_lock);
        }
        base.Dispose(disposing);
    }
}
