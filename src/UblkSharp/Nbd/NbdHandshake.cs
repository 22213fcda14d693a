using System.Buffers.Binary;
using System.Text;
using UblkSharp.Nbd.Protocol;
using static UblkSharp.Nbd.Protocol.NbdProtocol;

namespace UblkSharp.Nbd;

/// <summary>What the handshake settled: the export and the transmission options.</summary>
internal sealed record NbdSession(NbdExport Export, bool StructuredReplies, bool BaseAllocation, ushort Flags);

/// <summary>
/// The server side of the fixed newstyle handshake: EXPORT_NAME, ABORT, LIST, STARTTLS,
/// INFO, GO, STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT (base:allocation).
/// After STARTTLS is acknowledged the TLS handshake runs and option haggling starts over inside
/// it, with nothing negotiated before carried over. With TLS required, a client that has not
/// started TLS gets only NBD_REP_ERR_TLS_REQD (the protocol's FORCEDTLS).
/// Malformed options get NBD_REP_ERR_INVALID and the client may go on; a wrong magic, unknown
/// client flags, an oversized option, too many options or an unknown EXPORT_NAME end the
/// connection, as the protocol allows.
/// </summary>
internal sealed class NbdHandshake
{
    private const int MaxOptions = 256;
    private const int MaxOptionLength = 64 * 1024;
    private const uint BaseAllocationId = 1;

    private readonly NbdTransport _socket;
    private readonly NbdServer _server;
    private readonly Action _entering;
    private bool _structured;
    private string? _metaExport;
    private bool _baseAllocation;

    private NbdHandshake(NbdTransport socket, NbdServer server, Action entering)
    {
        _socket = socket;
        _server = server;
        _entering = entering;
    }

    /// <summary>
    /// Runs the handshake; null when it ended without a transmission phase. <paramref name="entering"/>
    /// runs just before the reply that ends it goes out: a client that has that reply is never
    /// taken for one still in its handshake.
    /// </summary>
    public static NbdSession? Negotiate(NbdTransport socket, NbdServer server, Action entering) => new NbdHandshake(socket, server, entering).Run();

    private NbdSession? Run()
    {
        Span<byte> greeting = stackalloc byte[18];
        BinaryPrimitives.WriteUInt64BigEndian(greeting, NbdMagic);
        BinaryPrimitives.WriteUInt64BigEndian(greeting[8..], OptionMagic);
        BinaryPrimitives.WriteUInt16BigEndian(greeting[16..], FlagFixedNewstyle | FlagNoZeroes);
        _socket.SendAll(greeting);

        Span<byte> word = stackalloc byte[4];
        if (!_socket.ReceiveExactly(word))
        {
            return null;
        }
        var clientFlags = BinaryPrimitives.ReadUInt32BigEndian(word);
        if ((clientFlags & ~(ClientFlagFixedNewstyle | ClientFlagNoZeroes)) != 0)
        {
            // The protocol: the server MUST drop the connection on a client flag it does not know.
            _server.NoteProtocolError($"client flags 0x{clientFlags:x} include unknown bits");
            return null;
        }
        var noZeroes = (clientFlags & ClientFlagNoZeroes) != 0;

        Span<byte> header = stackalloc byte[16];
        for (var i = 0; i < MaxOptions; i++)
        {
            if (!_socket.ReceiveExactly(header))
            {
                return null;
            }
            var magic = BinaryPrimitives.ReadUInt64BigEndian(header);
            var option = BinaryPrimitives.ReadUInt32BigEndian(header[8..]);
            var length = BinaryPrimitives.ReadUInt32BigEndian(header[12..]);
            if (magic != OptionMagic)
            {
                _server.NoteProtocolError($"bad option magic 0x{magic:x}");
                return null;
            }
            if (length > MaxOptionLength)
            {
                _server.NoteProtocolError($"{OptionName(option)} of {length} bytes is longer than {MaxOptionLength}");
                return null;
            }
            var data = length == 0 ? [] : new byte[length];
            _socket.ReceiveExactlyOrThrow(data);
            var session = Handle(option, data, noZeroes, out var end);
            if (session is not null || end)
            {
                return session;
            }
        }
        _server.NoteProtocolError($"more than {MaxOptions} options");
        return null;
    }

    private NbdSession? Handle(uint option, byte[] data, bool noZeroes, out bool end)
    {
        end = false;
        if (_server.TlsMode == NbdTlsMode.Require && !_socket.IsTls && option is not (OptStartTls or OptAbort))
        {
            _server.NoteTlsRequired(option);
            if (option == OptExportName)
            {
                // EXPORT_NAME has no error reply: the protocol says to drop the connection.
                end = true;
                return null;
            }
            Reply(option, RepErrTlsReqd, "TLS is required: send NBD_OPT_STARTTLS first");
            return null;
        }
        switch (option)
        {
            case OptExportName:
                end = true;
                return ExportName(data, noZeroes);
            case OptAbort:
                end = true;
                try
                {
                    Reply(option, RepAck);
                }
                catch (Exception e) when (SocketIo.IsConnectionError(e))
                {
                    // The client may close without reading the ACK.
                }
                return null;
            case OptList:
                if (data.Length != 0)
                {
                    Reply(option, RepErrInvalid, "LIST takes no data");
                    return null;
                }
                foreach (var export in _server.Exports)
                {
                    var name = Encoding.UTF8.GetBytes(export.Name);
                    var description = Encoding.UTF8.GetBytes(export.Description);
                    var body = new byte[4 + name.Length + description.Length];
                    BinaryPrimitives.WriteUInt32BigEndian(body, (uint)name.Length);
                    name.CopyTo(body, 4);
                    description.CopyTo(body, 4 + name.Length);
                    Reply(option, RepServer, body);
                }
                Reply(option, RepAck);
                return null;
            case OptStartTls:
                end = !StartTls(data);
                return null;
            case OptInfo:
            case OptGo:
                return InfoOrGo(option, data);
            case OptStructuredReply:
                if (data.Length != 0)
                {
                    Reply(option, RepErrInvalid, "STRUCTURED_REPLY takes no data");
                    return null;
                }
                _structured = true;
                Reply(option, RepAck);
                return null;
            case OptListMetaContext:
            case OptSetMetaContext:
                MetaContext(option, data);
                return null;
            default:
                Reply(option, RepErrUnsup, $"{OptionName(option)} is not supported");
                return null;
        }
    }

    /// <summary>STARTTLS: false when the connection must end (the TLS handshake failed).</summary>
    private bool StartTls(byte[] data)
    {
        if (_server.Tls is null)
        {
            Reply(OptStartTls, data.Length != 0 ? RepErrInvalid : RepErrUnsup, "this server does not offer TLS");
            return true;
        }
        if (data.Length != 0)
        {
            Reply(OptStartTls, RepErrInvalid, "STARTTLS takes no data");
            return true;
        }
        if (_socket.IsTls)
        {
            Reply(OptStartTls, RepErrInvalid, "TLS is already on");
            return true;
        }
        Reply(OptStartTls, RepAck);
        var rejected = new System.Runtime.CompilerServices.StrongBox<string?>();
        try
        {
            if (_server.Tls.Psk is { } psk)
            {
                _socket.StartPsk(psk, _server.Options.HandshakeTimeout);
            }
            else
            {
                _socket.StartTls(_server.Tls.ForConnection(rejected));
            }
        }
        catch (Exception e) when (e is System.Security.Authentication.AuthenticationException || SocketIo.IsConnectionError(e))
        {
            _server.NoteTlsFailure(rejected.Value ?? Reason(e));
            return false;
        }
        _server.NoteTlsStarted(_socket.Describe(), _socket.PskUser);
        // Option haggling starts over: what was agreed in the clear does not count.
        _structured = false;
        _metaExport = null;
        _baseAllocation = false;
        return true;
    }

    // The innermost message says what went wrong (an untrusted chain, a garbled record, a timeout).
    private static string Reason(Exception e)
    {
        var inner = e;
        while (inner.InnerException is not null)
        {
            inner = inner.InnerException;
        }
        return ReferenceEquals(inner, e) ? e.Message : $"{e.Message} ({inner.Message})";
    }

    private NbdSession? ExportName(byte[] data, bool noZeroes)
    {
        var export = _server.FindExport(Decode(data));
        if (export is null)
        {
            // EXPORT_NAME cannot fail politely: the protocol says to end the session.
            _server.NoteProtocolError($"EXPORT_NAME asked for an unknown export '{Decode(data)}'");
            return null;
        }
        var session = Start(export);
        var reply = new byte[noZeroes ? 10 : 134];
        BinaryPrimitives.WriteUInt64BigEndian(reply, (ulong)export.Size);
        BinaryPrimitives.WriteUInt16BigEndian(reply.AsSpan(8), session.Flags);
        _entering();
        _socket.SendAll(reply);
        return session;
    }

    private NbdSession Start(NbdExport export)
    {
        // Contexts chosen for another export do not carry over.
        var baseAllocation = _baseAllocation && _metaExport == export.Name;
        return new NbdSession(export, _structured, baseAllocation && _structured, export.TransmissionFlags(_structured));
    }

    private NbdSession? InfoOrGo(uint option, byte[] data)
    {
        if (data.Length < 6)
        {
            Reply(option, RepErrInvalid, $"{OptionName(option)} needs at least 6 bytes");
            return null;
        }
        var nameLength = BinaryPrimitives.ReadUInt32BigEndian(data);
        if (nameLength > (uint)data.Length - 6)
        {
            Reply(option, RepErrInvalid, "the export name runs past the end of the option");
            return null;
        }
        var count = BinaryPrimitives.ReadUInt16BigEndian(data.AsSpan(4 + (int)nameLength));
        if (data.Length != 4 + nameLength + 2 + (2 * count))
        {
            Reply(option, RepErrInvalid, "the number of information requests does not match the option's length");
            return null;
        }
        if (nameLength > MaxString)
        {
            Reply(option, RepErrTooBig, "the export name is longer than 4096 bytes");
            return null;
        }
        var name = Decode(data.AsSpan(4, (int)nameLength));
        var export = _server.FindExport(name);
        if (export is null)
        {
            Reply(option, RepErrUnknown, $"no export named '{name}' (see NBD_OPT_LIST)");
            return null;
        }
        bool wantName = false, wantDescription = false;
        for (var i = 0; i < count; i++)
        {
            switch (BinaryPrimitives.ReadUInt16BigEndian(data.AsSpan(6 + (int)nameLength + (2 * i))))
            {
                case InfoName:
                    wantName = true;
                    break;
                case InfoDescription:
                    wantDescription = true;
                    break;
                default:
                    break; // EXPORT and BLOCK_SIZE are always sent; unknown requests are ignored
            }
        }
        var session = Start(export);
        var info = new byte[12];
        BinaryPrimitives.WriteUInt16BigEndian(info, InfoExport);
        BinaryPrimitives.WriteUInt64BigEndian(info.AsSpan(2), (ulong)export.Size);
        BinaryPrimitives.WriteUInt16BigEndian(info.AsSpan(10), session.Flags);
        Reply(option, RepInfo, info);
        if (wantName)
        {
            Reply(option, RepInfo, InfoString(InfoName, export.Name));
        }
        if (wantDescription && export.Description.Length > 0)
        {
            Reply(option, RepInfo, InfoString(InfoDescription, export.Description));
        }
        // Sent whether asked for or not, as the protocol allows: clients that did not ask may ignore it.
        var sizes = new byte[14];
        BinaryPrimitives.WriteUInt16BigEndian(sizes, InfoBlockSize);
        BinaryPrimitives.WriteUInt32BigEndian(sizes.AsSpan(2), export.MinimumBlockSize);
        BinaryPrimitives.WriteUInt32BigEndian(sizes.AsSpan(6), export.PreferredBlockSize);
        BinaryPrimitives.WriteUInt32BigEndian(sizes.AsSpan(10), NbdExport.MaxPayload);
        Reply(option, RepInfo, sizes);
        if (option == OptGo)
        {
            _entering();
        }
        Reply(option, RepAck);
        return option == OptGo ? session : null;
    }

    private void MetaContext(uint option, byte[] data)
    {
        if (!_structured)
        {
            Reply(option, RepErrInvalid, "negotiate STRUCTURED_REPLY before metadata contexts");
            return;
        }
        // Parse the whole option before answering any of it.
        if (data.Length < 8)
        {
            Reply(option, RepErrInvalid, $"{OptionName(option)} needs at least 8 bytes");
            return;
        }
        var nameLength = BinaryPrimitives.ReadUInt32BigEndian(data);
        if (nameLength > (uint)data.Length - 8)
        {
            Reply(option, RepErrInvalid, "the export name runs past the end of the option");
            return;
        }
        var name = Decode(data.AsSpan(4, (int)nameLength));
        var pos = 4 + (int)nameLength;
        var count = BinaryPrimitives.ReadUInt32BigEndian(data.AsSpan(pos));
        pos += 4;
        var queries = new List<string>();
        for (uint i = 0; i < count; i++)
        {
            if (data.Length - pos < 4)
            {
                Reply(option, RepErrInvalid, "a query runs past the end of the option");
                return;
            }
            var length = BinaryPrimitives.ReadUInt32BigEndian(data.AsSpan(pos));
            pos += 4;
            if (length > (uint)(data.Length - pos))
            {
                Reply(option, RepErrInvalid, "a query runs past the end of the option");
                return;
            }
            queries.Add(Decode(data.AsSpan(pos, (int)length)));
            pos += (int)length;
        }
        if (pos != data.Length)
        {
            Reply(option, RepErrInvalid, "bytes left over after the last query");
            return;
        }
        if (_server.FindExport(name) is null)
        {
            Reply(option, RepErrUnknown, $"no export named '{name}'");
            return;
        }
        if (option == OptListMetaContext)
        {
            if (count == 0 || queries.Any(q => q is "base:" or BaseAllocation))
            {
                Reply(option, RepMetaContext, MetaContextBody(0, BaseAllocation));
            }
        }
        else
        {
            _metaExport = name;
            _baseAllocation = queries.Contains(BaseAllocation);
            if (_baseAllocation)
            {
                Reply(option, RepMetaContext, MetaContextBody(BaseAllocationId, BaseAllocation));
            }
        }
        Reply(option, RepAck);
    }

    private static byte[] MetaContextBody(uint id, string name)
    {
        var bytes = Encoding.UTF8.GetBytes(name);
        var body = new byte[4 + bytes.Length];
        BinaryPrimitives.WriteUInt32BigEndian(body, id);
        bytes.CopyTo(body, 4);
        return body;
    }

    private static byte[] InfoString(ushort type, string value)
    {
        var bytes = Encoding.UTF8.GetBytes(value);
        var body = new byte[2 + bytes.Length];
        BinaryPrimitives.WriteUInt16BigEndian(body, type);
        bytes.CopyTo(body, 2);
        return body;
    }

    private static string Decode(ReadOnlySpan<byte> bytes) => Encoding.UTF8.GetString(bytes);

    private void Reply(uint option, uint type, string message) => Reply(option, type, Encoding.UTF8.GetBytes(message));

    private void Reply(uint option, uint type, ReadOnlySpan<byte> body = default)
    {
        Span<byte> header = stackalloc byte[20];
        BinaryPrimitives.WriteUInt64BigEndian(header, OptionReplyMagic);
        BinaryPrimitives.WriteUInt32BigEndian(header[8..], option);
        BinaryPrimitives.WriteUInt32BigEndian(header[12..], type);
        BinaryPrimitives.WriteUInt32BigEndian(header[16..], (uint)body.Length);
        if (body.Length <= 1024)
        {
            Span<byte> all = stackalloc byte[20 + body.Length];
            header.CopyTo(all);
            body.CopyTo(all[20..]);
            _socket.SendAll(all);
        }
        else
        {
            _socket.SendAll(header);
            _socket.SendAll(body);
        }
    }
}
