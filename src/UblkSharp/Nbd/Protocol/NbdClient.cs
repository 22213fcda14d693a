using System.Buffers.Binary;
using System.Net;
using System.Net.Security;
using System.Net.Sockets;
using System.Runtime.CompilerServices;
using System.Security.Authentication;
using System.Text;
using UblkSharp.Interop.GnuTls;
using static UblkSharp.Nbd.Protocol.NbdProtocol;

namespace UblkSharp.Nbd.Protocol;

/// <summary>A server's refusal during the handshake (unknown export, TLS required, ...).</summary>
public sealed class NbdHandshakeException(string message) : IOException(message);

/// <summary>
/// One connection to an NBD server, used synchronously: one request at a time, simple replies.
/// The handshake is fixed newstyle with NBD_OPT_GO (EXPORT_NAME for servers without it); for an
/// nbds URI it starts with NBD_OPT_STARTTLS and goes on inside TLS, or fails. Transport failures throw (<see cref="IOException"/>, <see cref="SocketException"/>); errors the
/// server reports come back as a negative errno. Not thread-safe.
/// </summary>
public sealed class NbdClient : IDisposable
{
    private const int CopyLimit = 16 * 1024;
    public const int KeepAliveIdleSeconds = 30;
    public const int KeepAliveIntervalSeconds = 10;
    public const int KeepAliveProbes = 3;
    private readonly Socket _socket;
    // The TLS session over _socket once STARTTLS is done; every byte after it goes through it.
    private Stream? _tls;
    private readonly byte[] _send = new byte[RequestSize + CopyLimit];
    private readonly byte[] _reply = new byte[SimpleReplySize];
    private ulong _cookie;
    private bool _broken;
    private TimeSpan _ioTimeout;

    private NbdClient(Socket socket, string exportName)
    {
        _socket = socket;
        ExportName = exportName;
    }

    public string ExportName { get; }

    public long Size { get; private set; }

    public ushort Flags { get; private set; }

    public uint MinimumBlockSize { get; private set; } = 1;

    public uint PreferredBlockSize { get; private set; } = 4096;

    /// <summary>The largest READ/WRITE the server takes (32 MiB unless it said otherwise).</summary>
    public uint MaximumPayload { get; private set; } = 32 << 20;

    /// <summary>How long one send or receive may wait (zero: no bound). Set only when it changes.</summary>
    public TimeSpan IoTimeout
    {
        get => _ioTimeout;
        set
        {
            if (value != _ioTimeout)
            {
                var ms = value <= TimeSpan.Zero ? 0 : (int)Math.Clamp(Math.Ceiling(value.TotalMilliseconds), 1, int.MaxValue);
                _socket.ReceiveTimeout = ms;
                _socket.SendTimeout = ms;
                _ioTimeout = value;
            }
        }
    }

    /// <summary>The TLS protocol and cipher suite, or null for a plain connection.</summary>
    public string? TlsDescription { get; private set; }

    public bool IsReadOnly => (Flags & FlagReadOnly) != 0;

    public bool CanFlush => (Flags & FlagSendFlush) != 0;

    public bool CanFua => (Flags & FlagSendFua) != 0;

    public bool CanTrim => (Flags & FlagSendTrim) != 0;

    public bool CanWriteZeroes => (Flags & FlagSendWriteZeroes) != 0;

    public bool CanFastZero => (Flags & FlagSendFastZero) != 0;

    public bool CanCache => (Flags & FlagSendCache) != 0;

    public bool CanMultiConn => (Flags & FlagCanMultiConn) != 0;

    public bool IsRotational => (Flags & FlagRotational) != 0;

    /// <summary>
    /// Connects and negotiates. Throws <see cref="IOException"/> saying why it could not. Every
    /// send and receive after the handshake waits at most <paramref name="ioTimeout"/> (zero: no
    /// bound), so a server that vanished without a reset (a half-open TCP connection) makes a request
    /// throw instead of blocking its caller forever.
    /// </summary>
    /// <remarks>
    /// An nbds URI needs <paramref name="tls"/>: the server must accept NBD_OPT_STARTTLS and prove
    /// with a certificate from its CA that it is the URI's host; anything else is an
    /// <see cref="NbdHandshakeException"/>, never a fallback to plain NBD.
    /// </remarks>
    public static NbdClient Connect(NbdUri uri, TimeSpan timeout, TimeSpan ioTimeout = default, NbdClientTlsOptions? tls = null)
    {
        ArgumentNullException.ThrowIfNull(uri);
        if (uri.IsTls && tls is null)
        {
            throw new ArgumentException($"{uri}: TLS needs the certificates (a directory with ca-cert.pem: ?tls-certificates=DIR)");
        }
        Socket? socket = null;
        NbdClient? client = null;
        try
        {
            socket = Open(uri.Address, timeout);
            client = new NbdClient(socket, uri.ExportName);
            var ms = (int)Math.Min(int.MaxValue, timeout.TotalMilliseconds);
            socket.ReceiveTimeout = ms;
            socket.SendTimeout = ms;
            client.Handshake(uri.IsTls ? tls : null, uri.TlsHostname);
            socket.ReceiveTimeout = 0;
            socket.SendTimeout = 0;
            client.IoTimeout = ioTimeout;
            return client;
        }
        catch (NbdHandshakeException e)
        {
            // Named by the URI, as a failure to connect is: one line says which server refused what.
            client?.Close();
            socket?.Dispose();
            throw new NbdHandshakeException($"{uri}: {e.Message}");
        }
        catch (AuthenticationException e)
        {
            // A TLS failure past the handshake (an alert reading the first reply): not worth retrying.
            client?.Close();
            socket?.Dispose();
            throw new NbdHandshakeException($"{uri}: the server ended TLS: {e.Message}");
        }
        catch (Exception e) when (e is SocketException or IOException or ObjectDisposedException)
        {
            // A server that verifies clients refuses a certificate only after the TLS handshake
            // (TLS 1.3), by closing: say so, as the reset alone does not.
            var hint = client?.TlsDescription is null ? ""
                : tls!.Certificate is null ? " (after the TLS handshake: does the server want a client certificate from its CA in client-cert.pem?)"
                : " (after the TLS handshake: did the server refuse client-cert.pem?)";
            client?.Close();
            socket?.Dispose();
            throw new IOException($"cannot connect to {uri}: {e.Message}{hint}", e);
        }
    }

    private static Socket Open(NbdAddress address, TimeSpan timeout)
    {
        Exception? last = null;
        foreach (var endPoint in address.ResolveEndPoints())
        {
            var socket = endPoint is UnixDomainSocketEndPoint
                ? new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified)
                : new Socket(endPoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
            try
            {
                ConnectWithTimeout(socket, endPoint, timeout);
                if (endPoint is IPEndPoint)
                {
                    socket.NoDelay = true;
                    // An idle connection whose peer vanished is found within about a minute
                    // (30 s idle, then 3 probes 10 s apart) instead of never.
                    socket.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.KeepAlive, true);
                    socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveTime, KeepAliveIdleSeconds);
                    socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveInterval, KeepAliveIntervalSeconds);
                    socket.SetSocketOption(SocketOptionLevel.Tcp, SocketOptionName.TcpKeepAliveRetryCount, KeepAliveProbes);
                }
                return socket;
            }
            catch (SocketException e)
            {
                last = e;
                socket.Dispose();
            }
        }
        throw last ?? new SocketException((int)SocketError.HostNotFound);
    }

    // A blocking connect can hang for minutes on an unreachable host; a non-blocking one is polled.
    // (Async connect would switch the socket to .NET's emulated blocking mode for good.)
    private static void ConnectWithTimeout(Socket socket, EndPoint endPoint, TimeSpan timeout)
    {
        socket.Blocking = false;
        try
        {
            socket.Connect(endPoint);
        }
        catch (SocketException e) when (e.SocketErrorCode is SocketError.WouldBlock or SocketError.InProgress or SocketError.AlreadyInProgress)
        {
            if (!socket.Poll(timeout, SelectMode.SelectWrite))
            {
                throw new SocketException((int)SocketError.TimedOut);
            }
            var error = (int)socket.GetSocketOption(SocketOptionLevel.Socket, SocketOptionName.Error)!;
            if (error != 0)
            {
                throw new SocketException(error);
            }
        }
        finally
        {
            socket.Blocking = true;
        }
    }

    private void Handshake(NbdClientTlsOptions? tls, string? tlsHostname)
    {
        Span<byte> greeting = stackalloc byte[18];
        ReceiveExactlyOrThrow(greeting[..16]);
        if (BinaryPrimitives.ReadUInt64BigEndian(greeting) != NbdMagic)
        {
            throw new NbdHandshakeException("the server did not greet as an NBD server (bad magic)");
        }
        if (BinaryPrimitives.ReadUInt64BigEndian(greeting[8..]) != OptionMagic)
        {
            throw new NbdHandshakeException("the server speaks the oldstyle NBD handshake, which is not supported");
        }
        ReceiveExactlyOrThrow(greeting[16..]);
        var serverFlags = BinaryPrimitives.ReadUInt16BigEndian(greeting[16..]);
        var noZeroes = (serverFlags & FlagNoZeroes) != 0;
        Span<byte> word = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(word, ((serverFlags & FlagFixedNewstyle) != 0 ? ClientFlagFixedNewstyle : 0) | (noZeroes ? ClientFlagNoZeroes : 0));
        Send(word);
        if (tls is not null)
        {
            if ((serverFlags & FlagFixedNewstyle) == 0)
            {
                throw new NbdHandshakeException("the server does not offer TLS (it does not speak the fixed newstyle handshake that NBD_OPT_STARTTLS needs)");
            }
            StartTls(tls, tlsHostname);
        }
        if ((serverFlags & FlagFixedNewstyle) == 0 || !Go())
        {
            ExportNameOption(noZeroes);
        }
        if (Size < 0)
        {
            throw new NbdHandshakeException($"the server reports a size of {Size} bytes");
        }
    }

    /// <summary>
    /// NBD_OPT_STARTTLS, then the TLS handshake: the server must accept, and its certificate chain to
    /// the CA and name <paramref name="host"/> (unless null). Everything after goes through TLS.
    /// </summary>
    private void StartTls(NbdClientTlsOptions tls, string? host)
    {
        SendOption(OptStartTls, []);
        var body = ReceiveOptionReply(OptStartTls, out var type);
        if (type != RepAck)
        {
            var what = type switch
            {
                RepErrUnsup => "NBD_REP_ERR_UNSUP",
                RepErrPolicy => "NBD_REP_ERR_POLICY",
                RepErrInvalid => "NBD_REP_ERR_INVALID",
                _ => $"0x{type:x}",
            };
            throw new NbdHandshakeException($"the server does not offer TLS (it answered NBD_OPT_STARTTLS with {what}{Detail(body)}); refusing to go on without it");
        }
        if (tls.PskFile is not null)
        {
            StartTlsPsk(tls.PskFile, tls.PskUsername!);
            return;
        }
        var rejected = new StrongBox<string?>();
        var ssl = new SslStream(new NetworkStream(_socket, ownsSocket: false), leaveInnerStreamOpen: false);
        try
        {
            ssl.AuthenticateAsClient(tls.ForConnection(host, rejected));
        }
        catch (AuthenticationException e)
        {
            ssl.Dispose();
            throw new NbdHandshakeException($"the TLS handshake failed: {rejected.Value ?? e.Message}");
        }
        catch
        {
            ssl.Dispose();
            throw;
        }
        _tls = ssl;
        TlsDescription = $"{ssl.SslProtocol}, {ssl.NegotiatedCipherSuite}";
    }

    /// <summary>
    /// The TLS-PSK handshake (GnuTLS: SslStream has no PSK), on the socket itself, within the
    /// socket's receive timeout (the connect timeout during the handshake).
    /// </summary>
    private void StartTlsPsk(string file, string username)
    {
        using var credentials = GnuTlsPskClientCredentials.FromFile(file, username);
        // GnuTLS reads and writes the fd itself, in blocking calls (bounded by the socket's timeouts).
        UblkSharp.Interop.Libc.MakeBlocking((int)_socket.Handle);
        var session = GnuTlsSession.Client(credentials, (int)_socket.Handle, TimeSpan.FromMilliseconds(_socket.ReceiveTimeout > 0 ? _socket.ReceiveTimeout : int.MaxValue));
        try
        {
            session.Handshake();
        }
        catch (GnuTlsException e)
        {
            session.Dispose();
            throw new NbdHandshakeException($"the TLS-PSK handshake as '{username}' failed: {e.Message}");
        }
        var stream = new GnuTlsStream(session, _socket);
        _tls = stream;
        TlsDescription = stream.Description;
    }

    /// <summary>Reads one reply to <paramref name="option"/>: its body, and its type in <paramref name="type"/>.</summary>
    private byte[] ReceiveOptionReply(uint option, out uint type)
    {
        Span<byte> header = stackalloc byte[20];
        ReceiveExactlyOrThrow(header);
        if (BinaryPrimitives.ReadUInt64BigEndian(header) != OptionReplyMagic || BinaryPrimitives.ReadUInt32BigEndian(header[8..]) != option)
        {
            throw new NbdHandshakeException($"the server's reply to option {option} is malformed");
        }
        type = BinaryPrimitives.ReadUInt32BigEndian(header[12..]);
        var length = BinaryPrimitives.ReadUInt32BigEndian(header[16..]);
        if (length > 64 * 1024)
        {
            throw new NbdHandshakeException($"the server's reply to option {option} is {length} bytes long");
        }
        var body = new byte[length];
        ReceiveExactlyOrThrow(body);
        return body;
    }

    /// <summary>NBD_OPT_GO; false if the server does not know it (then EXPORT_NAME is the way in).</summary>
    private bool Go()
    {
        var name = Encoding.UTF8.GetBytes(ExportName);
        var data = new byte[4 + name.Length + 2 + 2];
        BinaryPrimitives.WriteUInt32BigEndian(data, (uint)name.Length);
        name.CopyTo(data, 4);
        BinaryPrimitives.WriteUInt16BigEndian(data.AsSpan(4 + name.Length), 1);
        BinaryPrimitives.WriteUInt16BigEndian(data.AsSpan(6 + name.Length), InfoBlockSize);
        SendOption(OptGo, data);
        var gotExport = false;
        for (var replies = 0; replies < 64; replies++)
        {
            var body = ReceiveOptionReply(OptGo, out var type);
            switch (type)
            {
                case RepAck:
                    if (!gotExport)
                    {
                        throw new NbdHandshakeException("the server finished NBD_OPT_GO without describing the export");
                    }
                    return true;
                case RepInfo when body.Length >= 2:
                    var info = BinaryPrimitives.ReadUInt16BigEndian(body);
                    if (info == InfoExport && body.Length >= 12)
                    {
                        Size = (long)BinaryPrimitives.ReadUInt64BigEndian(body.AsSpan(2));
                        Flags = BinaryPrimitives.ReadUInt16BigEndian(body.AsSpan(10));
                        gotExport = true;
                    }
                    else if (info == InfoBlockSize && body.Length >= 14)
                    {
                        MinimumBlockSize = Math.Max(1, BinaryPrimitives.ReadUInt32BigEndian(body.AsSpan(2)));
                        PreferredBlockSize = BinaryPrimitives.ReadUInt32BigEndian(body.AsSpan(6));
                        var max = BinaryPrimitives.ReadUInt32BigEndian(body.AsSpan(10));
                        MaximumPayload = Math.Clamp(max, MinimumBlockSize, 32u << 20);
                    }
                    break;
                case RepErrUnsup:
                    return false;
                case RepErrUnknown:
                    throw new NbdHandshakeException($"the server has no export '{ExportName}'{Detail(body)}");
                case RepErrTlsReqd:
                    throw new NbdHandshakeException($"the server requires TLS: use an nbds:// URI{Detail(body)}");
                default:
                    if ((type & 0x80000000) != 0)
                    {
                        throw new NbdHandshakeException($"the server refused export '{ExportName}' (error 0x{type:x}){Detail(body)}");
                    }
                    break; // replies we do not know are skipped
            }
        }
        throw new NbdHandshakeException("the server sent too many replies to NBD_OPT_GO");
    }

    private void ExportNameOption(bool noZeroes)
    {
        SendOption(OptExportName, Encoding.UTF8.GetBytes(ExportName));
        var reply = new byte[noZeroes ? 10 : 134];
        if (!ReceiveExactly(reply))
        {
            throw new NbdHandshakeException($"the server closed the connection: it has no export '{ExportName}'");
        }
        Size = (long)BinaryPrimitives.ReadUInt64BigEndian(reply);
        Flags = BinaryPrimitives.ReadUInt16BigEndian(reply.AsSpan(8));
    }

    private static string Detail(byte[] body) => body.Length == 0 ? "" : ": " + Encoding.UTF8.GetString(body);

    private void SendOption(uint option, byte[] data)
    {
        var message = new byte[16 + data.Length];
        BinaryPrimitives.WriteUInt64BigEndian(message, OptionMagic);
        BinaryPrimitives.WriteUInt32BigEndian(message.AsSpan(8), option);
        BinaryPrimitives.WriteUInt32BigEndian(message.AsSpan(12), (uint)data.Length);
        data.CopyTo(message, 16);
        Send(message);
    }

    // The transport: the socket, or the TLS session over it once there is one.
    private void Send(ReadOnlySpan<byte> data)
    {
        if (_tls is null)
        {
            SocketIo.SendAll(_socket, data);
        }
        else
        {
            _tls.Write(data);
        }
    }

    /// <summary>As <see cref="SocketIo.ReceiveExactly"/>: false on a clean end before the first byte.</summary>
    private bool ReceiveExactly(Span<byte> buffer)
    {
        if (_tls is null)
        {
            return SocketIo.ReceiveExactly(_socket, buffer);
        }
        var n = _tls.ReadAtLeast(buffer, buffer.Length, throwOnEndOfStream: false);
        if (n == 0 && buffer.Length > 0)
        {
            return false;
        }
        if (n < buffer.Length)
        {
            throw new EndOfStreamException($"the peer closed the connection {buffer.Length - n} bytes before the end of a message");
        }
        return true;
    }

    private void ReceiveExactlyOrThrow(Span<byte> buffer)
    {
        if (!ReceiveExactly(buffer))
        {
            throw new EndOfStreamException("the peer closed the connection");
        }
    }

    /// <summary>Reads the whole buffer (at most <see cref="MaximumPayload"/>); 0 or a negative errno.</summary>
    public int Read(Span<byte> buffer, long offset)
    {
        var error = Request(CmdRead, 0, offset, (uint)buffer.Length, ReadOnlySpan<byte>.Empty);
        if (error == 0)
        {
            Receive(buffer);
        }
        return FromNbdError(error);
    }

    public int Write(ReadOnlySpan<byte> data, long offset, bool fua)
        => FromNbdError(Request(CmdWrite, fua ? CmdFlagFua : (ushort)0, offset, (uint)data.Length, data));

    public int Flush() => FromNbdError(Request(CmdFlush, 0, 0, 0, ReadOnlySpan<byte>.Empty));

    public int Trim(long offset, uint length, bool fua)
        => FromNbdError(Request(CmdTrim, fua ? CmdFlagFua : (ushort)0, offset, length, ReadOnlySpan<byte>.Empty));

    public int WriteZeroes(long offset, uint length, bool mayUnmap, bool fua, bool fast)
    {
        var flags = (ushort)((mayUnmap ? 0 : CmdFlagNoHole) | (fua ? CmdFlagFua : 0) | (fast ? CmdFlagFastZero : 0));
        return FromNbdError(Request(CmdWriteZeroes, flags, offset, length, ReadOnlySpan<byte>.Empty));
    }

    public int Cache(long offset, uint length) => FromNbdError(Request(CmdCache, 0, offset, length, ReadOnlySpan<byte>.Empty));

    /// <summary>Sends a request and reads its simple reply's header; returns the NBD error.</summary>
    private uint Request(ushort type, ushort flags, long offset, uint length, ReadOnlySpan<byte> payload)
    {
        ObjectDisposedException.ThrowIf(_broken, this);
        var cookie = ++_cookie;
        try
        {
            var h = _send.AsSpan(0, RequestSize);
            BinaryPrimitives.WriteUInt32BigEndian(h, RequestMagic);
            BinaryPrimitives.WriteUInt16BigEndian(h[4..], flags);
            BinaryPrimitives.WriteUInt16BigEndian(h[6..], type);
            BinaryPrimitives.WriteUInt64BigEndian(h[8..], cookie);
            BinaryPrimitives.WriteUInt64BigEndian(h[16..], (ulong)offset);
            BinaryPrimitives.WriteUInt32BigEndian(h[24..], length);
            if (payload.Length <= CopyLimit)
            {
                payload.CopyTo(_send.AsSpan(RequestSize));
                Send(_send.AsSpan(0, RequestSize + payload.Length));
            }
            else
            {
                Send(h);
                Send(payload);
            }
            ReceiveExactlyOrThrow(_reply);
            if (BinaryPrimitives.ReadUInt32BigEndian(_reply) != SimpleReplyMagic || BinaryPrimitives.ReadUInt64BigEndian(_reply.AsSpan(8)) != cookie)
            {
                throw new IOException("the server sent a reply that does not match the request");
            }
            var error = BinaryPrimitives.ReadUInt32BigEndian(_reply.AsSpan(4));
            if (error == ESHUTDOWN)
            {
                throw new IOException("the server is shutting down");
            }
            return error;
        }
        catch
        {
            // Whatever broke, this connection is out of step now.
            _broken = true;
            throw;
        }
    }

    private void Receive(Span<byte> buffer)
    {
        try
        {
            ReceiveExactlyOrThrow(buffer);
        }
        catch
        {
            _broken = true;
            throw;
        }
    }

    /// <summary>
    /// Hands the connection over (to a caller that speaks the transmission phase itself, as the nbd
    /// target's ring backend does); this client is done with it and sends nothing more. Over TLS
    /// that is one end of a socketpair whose other end a <see cref="TlsRelay"/> carries to the TLS
    /// session, so the caller speaks plain NBD either way; closing it ends the TLS connection.
    /// </summary>
    internal Socket TakeSocket()
    {
        ObjectDisposedException.ThrowIf(_broken, this);
        _broken = true;
        if (_tls is null)
        {
            return _socket;
        }
        // The relay's reads and writes wait as long as the connection lives; the caller keeps time.
        _socket.ReceiveTimeout = 0;
        _socket.SendTimeout = 0;
        var tls = _tls;
        _tls = null;
        return TlsRelay.Start(tls, _socket, "nbd-tls");
    }

    /// <summary>Sends NBD_CMD_DISC (if the connection is still in step) and closes.</summary>
    public void Dispose()
    {
        if (!_broken)
        {
            _broken = true;
            try
            {
                var h = _send.AsSpan(0, RequestSize);
                h.Clear();
                BinaryPrimitives.WriteUInt32BigEndian(h, RequestMagic);
                BinaryPrimitives.WriteUInt16BigEndian(h[6..], CmdDisc);
                BinaryPrimitives.WriteUInt64BigEndian(h[8..], ++_cookie);
                Send(h);
                if (_tls is not null)
                {
                    CloseNotify(_tls);
                }
            }
            catch (Exception e) when (SocketIo.IsConnectionError(e))
            {
            }
        }
        Close();
    }

    /// <summary>
    /// Ends a TLS session properly (close_notify), so the server sees a clean close, not a
    /// truncation (GnuTLS servers log one); waits at most a second, and ignores a failure.
    /// </summary>
    internal static void CloseNotify(Stream tls)
    {
        try
        {
            if (tls is GnuTlsStream psk)
            {
                psk.CloseNotify();
            }
            else if (tls is SslStream ssl)
            {
                ssl.ShutdownAsync().Wait(TimeSpan.FromSeconds(1));
            }
        }
        catch (Exception e) when (e is AggregateException or IOException or ObjectDisposedException or InvalidOperationException)
        {
        }
    }

    /// <summary>Closes without a word (the TLS session, if any, and the socket).</summary>
    private void Close()
    {
        _broken = true;
        _tls?.Dispose();
        _tls = null;
        _socket.Dispose();
    }
}
