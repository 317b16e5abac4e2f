<?php
/**
 * Plugin Name: wpf-gateway loopback lock
 * Description: After WP Fusion applies tags to a contact, ask wpf-gateway to ignore that
 *              contact's update/update_tags webhooks for a minute (the CRM's echo of our write).
 *
 * Install as wp-content/mu-plugins/wpf-gateway-lock.php. Set WPF_GATEWAY_URL in wp-config.php
 * when the gateway is not reachable as this site's own URL (e.g. 'http://127.0.0.1:8080').
 */
add_action( 'wpf_tags_applied', function ( $user_id, $tags ) {
	$contact_id = wp_fusion()->user->get_contact_id( $user_id );
	if ( empty( $contact_id ) ) {
		return;
	}
	$base = defined( 'WPF_GATEWAY_URL' ) ? WPF_GATEWAY_URL : home_url( '/' );
	$url  = add_query_arg( array(
		'wpf_action' => 'lock',
		'access_key' => wpf_get_option( 'access_key' ),
		'contact_id' => $contact_id,
		'ttl'        => 60,
	), $base );
	wp_remote_post( $url, array( 'timeout' => 2, 'blocking' => false ) );
}, 10, 2 );
