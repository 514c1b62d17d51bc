//! The attributes behind `edgegw_plugin_sdk::rule` and `edgegw_plugin_sdk::init`. Use them
//! through the SDK; the generated code names only `::edgegw_plugin_sdk` paths.
//!
//! `#[rule]` keeps the author's function callable as written (so native unit tests call it
//! directly), defines the plugin type `__EdgegwPlugin` in the same module, and, when built for
//! WebAssembly, implements the WIT world's `Guest` trait for it and exports it. `#[init]`
//! implements the SDK's `Init` trait for that type; the `Guest::init` glue finds it at compile
//! time (autoref dispatch), so a plugin without `#[init]` gets an `init` that accepts any
//! config. Both attributes must therefore sit in the same module (usually the crate root).

use proc_macro::TokenStream;
use quote::{format_ident, quote};
use syn::{FnArg, ItemFn, ReturnType, parse_macro_input, spanned::Spanned};

/// Marks the function that handles each message. See `edgegw_plugin_sdk::rule`.
#[proc_macro_attribute]
pub fn rule(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return error(
            proc_macro2::TokenStream::from(attr).span(),
            "#[rule] takes no arguments",
        );
    }
    let function = parse_macro_input!(item as ItemFn);
    if let Err(e) = check_signature(&function, "rule", "msg: Message") {
        return e.to_compile_error().into();
    }
    let ItemFn {
        attrs,
        vis,
        sig,
        block,
    } = function;
    let name = &sig.ident;
    let inner = format_ident!("__edgegw_rule_{}", name);
    let mut inner_sig = sig.clone();
    inner_sig.ident = inner.clone();

    // Doc comments describe the rule's function; everything else (lints, cfg) also applies
    // to the body, which is the inner function.
    let (docs, others): (Vec<_>, Vec<_>) =
        attrs.into_iter().partition(|a| a.path().is_ident("doc"));
    let cfgs: Vec<_> = others.iter().filter(|a| a.path().is_ident("cfg")).collect();
    quote! {
        #(#others)*
        #[inline(always)]
        #inner_sig #block

        #(#docs)*
        #(#cfgs)*
        // The export calls the inner function directly, so native builds (tests aside) and
        // WebAssembly builds may not call this one.
        #[allow(dead_code)]
        #vis fn #name(
            msg: ::edgegw_plugin_sdk::Message,
        ) -> ::core::result::Result<
            ::std::vec::Vec<::edgegw_plugin_sdk::Output>,
            ::edgegw_plugin_sdk::Error,
        > {
            // The topic is kept aside so that an error, whoever made it, names the message.
            let topic = ::core::clone::Clone::clone(&msg.topic);
            ::edgegw_plugin_sdk::__private::finish(topic, #inner(msg))
        }

        /// The plugin's type: exported as the `rule` world when built for WebAssembly.
        #[doc(hidden)]
        pub struct __EdgegwPlugin;

        impl __EdgegwPlugin {
            /// The rule as the export calls it (public, so that a native build, which has no
            /// export, does not see the rule as dead code). Without the topic on errors: the
            /// host names the message itself, so the topic is not copied for every message.
            #[doc(hidden)]
            pub fn on_message(
                msg: ::edgegw_plugin_sdk::Message,
            ) -> ::core::result::Result<
                ::std::vec::Vec<::edgegw_plugin_sdk::Output>,
                ::edgegw_plugin_sdk::Error,
            > {
                ::edgegw_plugin_sdk::__private::finish_in_host(#inner(msg))
            }
        }

        #[cfg(target_family = "wasm")]
        const _: () = {
            use ::edgegw_plugin_sdk::__private::bindings;
            impl bindings::Guest for __EdgegwPlugin {
                fn init(config: ::std::string::String) -> ::core::result::Result<(), ::std::string::String> {
                    #[allow(unused_imports)]
                    use ::edgegw_plugin_sdk::__private::{InitByDefault as _, InitByTrait as _};
                    (&::edgegw_plugin_sdk::__private::InitProbe::<__EdgegwPlugin>::new()).run(&config)
                }
                fn on_message(
                    msg: bindings::edgegw::rule::types::Message,
                ) -> ::core::result::Result<
                    ::std::vec::Vec<bindings::edgegw::rule::types::Output>,
                    ::std::string::String,
                > {
                    ::edgegw_plugin_sdk::__private::on_message(msg, __EdgegwPlugin::on_message)
                }
                fn on_batch(
                    msgs: ::std::vec::Vec<bindings::edgegw::rule::types::Message>,
                ) -> ::std::vec::Vec<::core::result::Result<
                    ::std::vec::Vec<bindings::edgegw::rule::types::Output>,
                    ::std::string::String,
                >> {
                    ::edgegw_plugin_sdk::__private::on_batch(msgs, __EdgegwPlugin::on_message)
                }
            }
            bindings::export!(__EdgegwPlugin with_types_in ::edgegw_plugin_sdk::__private::bindings);
        };
    }
    .into()
}

/// Marks the function that receives the stage's config. See `edgegw_plugin_sdk::init`.
#[proc_macro_attribute]
pub fn init(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return error(
            proc_macro2::TokenStream::from(attr).span(),
            "#[init] takes no arguments",
        );
    }
    let function = parse_macro_input!(item as ItemFn);
    if let Err(e) = check_signature(&function, "init", "config: serde_json::Value") {
        return e.to_compile_error().into();
    }
    let name = &function.sig.ident;
    quote! {
        #function

        impl ::edgegw_plugin_sdk::__private::Init for __EdgegwPlugin {
            fn init(config: &str) -> ::core::result::Result<(), ::std::string::String> {
                ::edgegw_plugin_sdk::__private::init(config, #name)
            }
        }
    }
    .into()
}

/// One plain argument, a return type, not async, not generic.
fn check_signature(function: &ItemFn, attribute: &str, argument: &str) -> syn::Result<()> {
    let sig = &function.sig;
    let usage = format!(
        "#[{attribute}] expects `fn {}({argument}) -> Result<..>`",
        sig.ident
    );
    if sig.asyncness.is_some() || !sig.generics.params.is_empty() || sig.variadic.is_some() {
        return Err(syn::Error::new(sig.span(), usage));
    }
    if sig.inputs.len() != 1 || matches!(sig.inputs.first(), Some(FnArg::Receiver(_))) {
        return Err(syn::Error::new(sig.inputs.span(), usage));
    }
    if matches!(sig.output, ReturnType::Default) {
        return Err(syn::Error::new(sig.span(), usage));
    }
    Ok(())
}

fn error(span: proc_macro2::Span, message: &str) -> TokenStream {
    syn::Error::new(span, message).to_compile_error().into()
}
