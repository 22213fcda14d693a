using System.Reflection;
using System.Reflection.Emit;
using UblkSharp.Nbd.Protocol;
using UblkSharp.Targets;

namespace UblkSharp.Tests.Nbd;

/// <summary>
/// Dependencies point down: the NBD protocol and client sit below the targets (the nbd target uses
/// the client), the NBD server sits above them (it serves a BlockTarget). Checked over signatures
/// and method bodies (every type, method and field token the IL names), so a stray use anywhere fails.
/// </summary>
public class NbdLayeringTests
{
    private const string Protocol = "UblkSharp.Nbd.Protocol";
    private const string Server = "UblkSharp.Nbd";
    private const string Targets = "UblkSharp.Targets";

    private static readonly Assembly Library = typeof(NbdClient).Assembly;

    [Fact]
    public void ProtocolAndClientUseNeitherTargetsNorTheServer()
    {
        var bad = Uses(InNamespace(Protocol), ns => IsIn(ns, Targets) || ns == Server);
        Assert.Empty(bad);
    }

    [Fact]
    public void TargetsDoNotUseTheServer()
    {
        var bad = Uses(InNamespace(Targets), ns => ns == Server);
        Assert.Empty(bad);
    }

    [Fact]
    public void TheScannerSeesUsesInMethodBodies()
    {
        // The nbd target uses the client only inside method bodies and fields: the scan must see it,
        // or the two checks above would pass vacuously.
        var uses = Uses([typeof(NbdTarget)], ns => ns == Protocol);
        Assert.Contains(uses, u => u.Contains(nameof(NbdClient), StringComparison.Ordinal));
    }

    private static bool IsIn(string? ns, string root) => ns is not null && (ns == root || ns.StartsWith(root + ".", StringComparison.Ordinal));

    private static Type[] InNamespace(string ns) => [.. Library.GetTypes().Where(t => IsIn(t.Namespace, ns) && (ns != Server || t.Namespace == Server))];

    private static List<string> Uses(IEnumerable<Type> types, Func<string?, bool> forbidden)
    {
        var found = new List<string>();
        foreach (var type in types)
        {
            foreach (var used in Referenced(type))
            {
                foreach (var t in Expand(used))
                {
                    if (forbidden(t.Namespace))
                    {
                        found.Add($"{type.FullName} uses {t.FullName}");
                    }
                }
            }
        }
        return [.. found.Distinct()];
    }

    // A type and the types it is built from (generic arguments, element types, declaring types).
    private static IEnumerable<Type> Expand(Type type)
    {
        yield return type;
        if (type.HasElementType)
        {
            foreach (var t in Expand(type.GetElementType()!))
            {
                yield return t;
            }
        }
        if (type.IsGenericType && !type.IsGenericTypeDefinition)
        {
            foreach (var t in type.GetGenericArguments().SelectMany(Expand))
            {
                yield return t;
            }
        }
    }

    private const BindingFlags All = BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.Instance | BindingFlags.Static | BindingFlags.DeclaredOnly;

    private static IEnumerable<Type> Referenced(Type type)
    {
        if (type.BaseType is not null)
        {
            yield return type.BaseType;
        }
        foreach (var i in type.GetInterfaces())
        {
            yield return i;
        }
        foreach (var f in type.GetFields(All))
        {
            yield return f.FieldType;
        }
        foreach (var p in type.GetProperties(All))
        {
            yield return p.PropertyType;
        }
        foreach (var m in type.GetMethods(All).Cast<MethodBase>().Concat(type.GetConstructors(All)))
        {
            if (m is MethodInfo mi)
            {
                yield return mi.ReturnType;
            }
            foreach (var p in m.GetParameters())
            {
                yield return p.ParameterType;
            }
            var body = m.GetMethodBody();
            if (body is null)
            {
                continue;
            }
            foreach (var l in body.LocalVariables)
            {
                yield return l.LocalType;
            }
            foreach (var t in Tokens(m, body.GetILAsByteArray() ?? []))
            {
                yield return t;
            }
        }
    }

    private static readonly Dictionary<short, OpCode> OpCodeTable = typeof(OpCodes)
        .GetFields(BindingFlags.Public | BindingFlags.Static)
        .Select(f => (OpCode)f.GetValue(null)!)
        .ToDictionary(o => o.Value);

    /// <summary>The types that the IL's type, method and field operands name.</summary>
    private static IEnumerable<Type> Tokens(MethodBase method, byte[] il)
    {
        var module = method.Module;
        var typeArgs = method.DeclaringType is { IsGenericType: true } d ? d.GetGenericArguments() : null;
        var methodArgs = method.IsGenericMethod ? method.GetGenericArguments() : null;
        var i = 0;
        while (i < il.Length)
        {
            short value = il[i++];
            if (value == 0xfe)
            {
                value = (short)(0xfe00 | il[i++]);
            }
            var op = OpCodeTable[value];
            switch (op.OperandType)
            {
                case OperandType.InlineType or OperandType.InlineMethod or OperandType.InlineField or OperandType.InlineTok:
                    var token = BitConverter.ToInt32(il, i);
                    i += 4;
                    MemberInfo? member;
                    try
                    {
                        member = module.ResolveMember(token, typeArgs, methodArgs);
                    }
                    catch (ArgumentException)
                    {
                        member = null;
                    }
                    switch (member)
                    {
                        case Type t:
                            yield return t;
                            break;
                        case FieldInfo f:
                            yield return f.DeclaringType!;
                            yield return f.FieldType;
                            break;
                        case MethodBase mb:
                            yield return mb.DeclaringType!;
                            if (mb is MethodInfo mi)
                            {
                                yield return mi.ReturnType;
                            }
                            break;
                    }
                    break;
                case OperandType.InlineSwitch:
                    var count = BitConverter.ToInt32(il, i);
                    i += 4 + (4 * count);
                    break;
                case OperandType.InlineNone:
                    break;
                case OperandType.ShortInlineBrTarget or OperandType.ShortInlineI or OperandType.ShortInlineVar:
                    i += 1;
                    break;
                case OperandType.InlineVar:
                    i += 2;
                    break;
                case OperandType.InlineI8 or OperandType.InlineR:
                    i += 8;
                    break;
                default:
                    i += 4;
                    break;
            }
        }
    }
}
